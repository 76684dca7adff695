//! Group commit: callers submit one job each and wait for its result, while a few
//! worker tasks take every job waiting (up to a batch) and handle them together, in one
//! database transaction for example. Under load this turns many small commits into a
//! few larger ones; at low load a batch is one job and adds no delay.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::{Mutex, mpsc, oneshot};
use tokio::task::JoinSet;

/// The batcher stopped before it handled the job (shutdown).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the batch writer is shutting down")]
pub struct Closed;

struct Entry<J, R> {
    job: J,
    reply: oneshot::Sender<R>,
}

/// Handle to the workers; clone freely. Dropping every clone lets the workers handle
/// what is queued and stop.
pub struct Batcher<J, R> {
    jobs: mpsc::Sender<Entry<J, R>>,
}

impl<J, R> Clone for Batcher<J, R> {
    fn clone(&self) -> Self {
        Self { jobs: self.jobs.clone() }
    }
}

impl<J: Send + 'static, R: Send + 'static> Batcher<J, R> {
    /// Starts `workers` tasks. `handle` gets each batch and must return one result per
    /// job, in order. `name` labels the `reach_batch_size` histogram.
    pub fn start<H, F>(name: &'static str, workers: usize, max_batch: usize, handle: H) -> (Self, JoinSet<()>)
    where
        H: Fn(Vec<J>) -> F + Send + Sync + 'static,
        F: Future<Output = Vec<R>> + Send,
    {
        metrics::describe_histogram!("reach_batch_size", "Jobs handled together by a group-commit writer, by writer");
        let max_batch = max_batch.max(1);
        let (jobs, receiver) = mpsc::channel::<Entry<J, R>>(max_batch * workers.max(1) * 4);
        let receiver = Arc::new(Mutex::new(receiver));
        let handle = Arc::new(handle);
        let mut tasks = JoinSet::new();
        for _ in 0..workers.max(1) {
            let receiver = receiver.clone();
            let handle = handle.clone();
            tasks.spawn(async move {
                loop {
                    let mut batch = Vec::with_capacity(max_batch);
                    {
                        // One worker collects at a time, so batches fill up under load.
                        let mut receiver = receiver.lock().await;
                        match receiver.recv().await {
                            Some(entry) => batch.push(entry),
                            None => return,
                        }
                        while batch.len() < max_batch {
                            match receiver.try_recv() {
                                Ok(entry) => batch.push(entry),
                                Err(_) => break,
                            }
                        }
                    }
                    metrics::histogram!("reach_batch_size", "writer" => name).record(batch.len() as f64);
                    let (jobs, replies): (Vec<J>, Vec<oneshot::Sender<R>>) = batch.into_iter().map(|e| (e.job, e.reply)).unzip();
                    let count = jobs.len();
                    let results = handle(jobs).await;
                    assert_eq!(results.len(), count, "a batch handler returns one result per job");
                    for (reply, result) in replies.into_iter().zip(results) {
                        // The caller may have gone away (its request was cancelled).
                        let _ = reply.send(result);
                    }
                }
            });
        }
        (Self { jobs }, tasks)
    }

    /// Submits a job and waits for its result.
    pub async fn submit(&self, job: J) -> Result<R, Closed> {
        let (reply, answer) = oneshot::channel();
        self.jobs.send(Entry { job, reply }).await.map_err(|_| Closed)?;
        answer.await.map_err(|_| Closed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn jobs_batch_under_load() {
        let (batcher, mut tasks) = Batcher::start("test", 1, 16, |jobs: Vec<u32>| async move {
            tokio::task::yield_now().await;
            let size = jobs.len();
            jobs.into_iter().map(|job| (job * 2, size)).collect::<Vec<_>>()
        });
        let results = futures::future::join_all((0..64).map(|n| batcher.submit(n))).await;
        for (n, result) in results.iter().enumerate() {
            assert_eq!(result.unwrap().0, n as u32 * 2, "each caller gets its own result");
        }
        assert!(results.iter().any(|r| r.unwrap().1 > 1), "concurrent jobs share a batch");
        assert!(results.iter().all(|r| r.unwrap().1 <= 16), "no batch exceeds the maximum");
        drop(batcher);
        while tasks.join_next().await.is_some() {}
    }
}
