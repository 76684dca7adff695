//! The shutdown signal: a cancellation token fired once by SIGTERM or Ctrl-C. Services
//! receive the token from `main` and pass child tokens down; nothing reads a global.

use tokio_util::sync::CancellationToken;

/// Returns a token that is cancelled when the process receives SIGTERM or SIGINT.
pub fn on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let fired = token.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(term) => term,
            Err(error) => {
                tracing::error!(%error, "failed to install the SIGTERM handler");
                let _ = ctrl_c.await;
                fired.cancel();
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => tracing::info!("received SIGINT, shutting down"),
            _ = term.recv() => tracing::info!("received SIGTERM, shutting down"),
        }
        fired.cancel();
    });
    token
}
