//! The loadgen's provisioning files. The demo's: one org with the two demo numbers,
//! each on its own WABA, and two subscriptions pointing at the verifying subscriber,
//! one for every event type and one for a list of message events. The benchmark's: one
//! org with the first demo number and N subscriptions to every event type. The ids are
//! fixed, so writing a file again and applying it to the same database rotates the
//! secrets and changes nothing else.

use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use anyhow::{Context, bail, ensure};
use rand::Rng;
use reach_shared::provision::ProvisioningFile;
use reach_shared::secrets::SecretSealer;
use reach_shared::settings::{Env, Environment};
use reach_shared::signing::WebhookSecret;
use secrecy::{ExposeSecret, SecretString};
use serde_json::json;
use sqlx::PgPool;
use url::Url;
use uuid::{Uuid, uuid};

use crate::generator::{BusinessNumber, demo_numbers};
use crate::subscriber::Endpoint;

pub const DEMO_ORG_ID: Uuid = uuid!("5f0c1e2a-7b3d-4c9e-8a1f-2d6b9e0c4a71");
const ALL_EVENTS_SUBSCRIPTION_ID: Uuid = uuid!("5f0c1e2a-7b3d-4c9e-8a1f-2d6b9e0c4a72");
const MESSAGE_EVENTS_SUBSCRIPTION_ID: Uuid = uuid!("5f0c1e2a-7b3d-4c9e-8a1f-2d6b9e0c4a73");

/// Event types of the second subscription; the other event types only reach the first.
pub const MESSAGE_EVENTS: [&str; 3] = ["message.received", "message.delivered", "message.read"];

/// Writes a new demo provisioning file with fresh secrets, readable by its owner only
/// because it contains them.
pub fn write_demo_file(path: &Path, subscriber_addr: SocketAddr) -> anyhow::Result<()> {
    ensure!(subscriber_addr.ip().is_loopback(), "the subscriber address {subscriber_addr} is not a loopback address");
    // The first number has the default 80 MPS; the second had Meta's throughput
    // upgrade to 1,000.
    let wabas: Vec<_> = demo_numbers()
        .into_iter()
        .zip([80, 1000])
        .map(|(number, mps)| {
            json!({
                "waba_id": number.waba_id,
                "access_token": format!("demo-token-{}", hex::encode(rand::rng().random::<[u8; 16]>())),
                "phone_numbers": [{
                    "phone_number_id": number.phone_number_id,
                    "display_phone_number": number.display_phone_number,
                    "mps": mps,
                    "quality_rating": "GREEN",
                }],
            })
        })
        .collect();
    let file = json!({"orgs": [{
        "id": DEMO_ORG_ID,
        "slug": "demo",
        "name": "Demo Org",
        "wabas": wabas,
        "subscriptions": [
            {
                "id": ALL_EVENTS_SUBSCRIPTION_ID,
                "url": format!("http://{subscriber_addr}/hooks/all"),
                "events": ["*"],
                "secret": WebhookSecret::generate().expose_secret(),
            },
            {
                "id": MESSAGE_EVENTS_SUBSCRIPTION_ID,
                "url": format!("http://{subscriber_addr}/hooks/messages"),
                "events": MESSAGE_EVENTS,
                "secret": WebhookSecret::generate().expose_secret(),
            },
        ],
    }]});
    write_private_json(path, &file)
}

/// The org of the benchmark provisioning files.
pub const BENCH_ORG_ID: Uuid = uuid!("8d2f4a60-3c1b-4e7a-9f05-6b2c8e1d7a30");

/// Writes a benchmark provisioning file: one org with the first demo number (the one
/// `bench/ingress_baseline.sql` routes to) and `endpoints` subscriptions to every event
/// type, each with its own fresh secret and subscriber path `/hooks/bench-{i}`.
pub fn write_bench_file(path: &Path, subscriber_addr: SocketAddr, endpoints: usize) -> anyhow::Result<()> {
    ensure!(subscriber_addr.ip().is_loopback(), "the subscriber address {subscriber_addr} is not a loopback address");
    ensure!(endpoints >= 1, "a benchmark needs at least one endpoint");
    let number = demo_numbers().into_iter().next().expect("two demo numbers");
    let subscriptions: Vec<_> = (0..endpoints)
        .map(|index| {
            json!({
                "id": Uuid::from_u128(BENCH_ORG_ID.as_u128() + 1 + index as u128),
                "url": format!("http://{subscriber_addr}/hooks/bench-{index}"),
                "events": ["*"],
                "secret": WebhookSecret::generate().expose_secret(),
            })
        })
        .collect();
    let file = json!({"orgs": [{
        "id": BENCH_ORG_ID,
        "slug": "bench",
        "name": "Benchmark Org",
        "wabas": [{
            "waba_id": number.waba_id,
            "access_token": format!("bench-token-{}", hex::encode(rand::rng().random::<[u8; 16]>())),
            "phone_numbers": [{
                "phone_number_id": number.phone_number_id,
                "display_phone_number": number.display_phone_number,
                "mps": 80,
                "quality_rating": "GREEN",
            }],
        }],
        "subscriptions": subscriptions,
    }]});
    write_private_json(path, &file)
}

/// Writes `value` to `path`, readable by its owner only because it contains secrets.
fn write_private_json(path: &Path, value: &serde_json::Value) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(value).context("failed to serialise the provisioning file")?;
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("failed to create {}", path.display()))?;
    out.write_all(text.as_bytes()).with_context(|| format!("failed to write {}", path.display()))?;
    Ok(())
}

/// A subscription of the file, as the demo serves and checks it.
pub struct DemoSubscription {
    pub id: Uuid,
    pub path: String,
    pub events: Vec<String>,
    /// A valid `whsec_` secret, checked when the file was read.
    secret: SecretString,
}

/// The parts of a provisioning file the demo uses.
pub struct DemoSetup {
    pub file: ProvisioningFile,
    pub org_id: Uuid,
    pub numbers: Vec<BusinessNumber>,
    pub subscriber_addr: SocketAddr,
    pub subscriptions: Vec<DemoSubscription>,
}

impl DemoSetup {
    /// Reads a provisioning file with one org whose subscriptions all point at one
    /// loopback address, the subscriber's.
    pub fn read(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("failed to read {}", path.display()))?;
        let file = ProvisioningFile::parse(&text)?;
        let [org] = file.orgs.as_slice() else {
            bail!("{}: expected exactly one org, found {}", path.display(), file.orgs.len());
        };
        let numbers: Vec<BusinessNumber> = org
            .wabas
            .iter()
            .flat_map(|waba| {
                waba.phone_numbers.iter().map(|number| BusinessNumber {
                    waba_id: waba.waba_id.clone(),
                    phone_number_id: number.phone_number_id.clone(),
                    display_phone_number: number.display_phone_number.chars().filter(char::is_ascii_digit).collect(),
                })
            })
            .collect();
        ensure!(!numbers.is_empty(), "{}: the org has no phone number", path.display());
        ensure!(!org.subscriptions.is_empty(), "{}: the org has no subscription", path.display());

        let mut subscriber_addr = None;
        let mut subscriptions = Vec::new();
        for subscription in &org.subscriptions {
            let url = Url::parse(&subscription.url).with_context(|| format!("invalid subscription url {}", subscription.url))?;
            let addrs = url.socket_addrs(|| None).with_context(|| format!("failed to resolve {}", subscription.url))?;
            let addr = *addrs.first().with_context(|| format!("{} resolves to no address", subscription.url))?;
            ensure!(addr.ip().is_loopback(), "subscription url {} is not on a loopback address", subscription.url);
            match subscriber_addr {
                None => subscriber_addr = Some(addr),
                Some(first) => ensure!(first == addr, "subscriptions point at two addresses, {first} and {addr}"),
            }
            subscriptions.push(DemoSubscription {
                id: subscription.id,
                path: url.path().to_owned(),
                events: subscription.events.clone(),
                secret: subscription.secret.expose_secret().to_owned().into(),
            });
        }
        let org_id = org.id;
        Ok(Self { subscriber_addr: subscriber_addr.expect("at least one subscription"), file, org_id, numbers, subscriptions })
    }

    /// Applies the file to the fleet's database, sealing the secrets the way the
    /// services are configured to (`REACH_SECRETS_MODE`). `path` names the file in the log.
    pub async fn apply(&self, pool: &PgPool, path: &Path) -> anyhow::Result<()> {
        let env = Env::process();
        let environment = env.parse_or("REACH_ENV", Environment::Development)?;
        let sealer = SecretSealer::from_env(&env, environment)?;
        let written = self.file.apply(pool, &sealer).await.context("failed to apply the provisioning file")?;
        eprintln!("applied {}: {}", path.display(), serde_json::to_string(&written)?);
        Ok(())
    }

    /// Returns the subscriber's endpoints, in subscription order.
    pub fn endpoints(&self) -> Vec<Endpoint> {
        self.subscriptions
            .iter()
            .map(|s| Endpoint {
                path: s.path.clone(),
                secret: WebhookSecret::parse(s.secret.expose_secret()).expect("ProvisioningFile::parse validated the secret"),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::expect::EventFilter;
    use reach_shared::events::EventType;

    fn temp_path(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("reach-loadgen-{}-{name}", Uuid::new_v4().simple()))
    }

    #[test]
    fn demo_file_round_trips() {
        let path = temp_path("provisioning.json");
        write_demo_file(&path, "127.0.0.1:9200".parse().unwrap()).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions();
        assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777, 0o600);

        let setup = DemoSetup::read(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(setup.org_id, DEMO_ORG_ID);
        assert_eq!(setup.numbers, demo_numbers());
        assert_eq!(setup.subscriber_addr, "127.0.0.1:9200".parse().unwrap());
        let paths: Vec<&str> = setup.subscriptions.iter().map(|s| s.path.as_str()).collect();
        assert_eq!(paths, ["/hooks/all", "/hooks/messages"]);
        let filters: Vec<EventFilter> = setup.subscriptions.iter().map(|s| EventFilter::new(&s.events)).collect();
        assert!(filters[0].matches(EventType::TemplateStatusUpdated));
        assert!(filters[1].matches(EventType::MessageDelivered));
        assert!(!filters[1].matches(EventType::MessageSent));
    }

    #[test]
    fn bench_file_has_one_number_and_n_endpoints() {
        let path = temp_path("bench.json");
        write_bench_file(&path, "127.0.0.1:9300".parse().unwrap(), 10).unwrap();
        let setup = DemoSetup::read(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(setup.org_id, BENCH_ORG_ID);
        assert_eq!(setup.numbers, demo_numbers()[..1]);
        assert_eq!(setup.subscriptions.len(), 10);
        assert_eq!(setup.subscriptions[3].path, "/hooks/bench-3");
        assert!(setup.subscriptions.iter().all(|s| s.events == ["*"]));
        let ids: std::collections::HashSet<Uuid> = setup.subscriptions.iter().map(|s| s.id).collect();
        assert_eq!(ids.len(), 10);
        assert_eq!(setup.endpoints().len(), 10);
    }

    #[test]
    fn fixture_number_present() {
        let numbers = demo_numbers();
        assert!(numbers.iter().any(|n| n.waba_id == "100000000000001"
            && n.phone_number_id == "200000000000001"
            && n.display_phone_number == "15550001111"));
    }

    #[test]
    fn non_loopback_subscriber_rejected() {
        let path = temp_path("public.json");
        assert!(write_demo_file(&path, "192.0.2.1:9200".parse().unwrap()).is_err());
        assert!(!path.exists());
    }

    #[test]
    fn fresh_secrets_each_write() {
        let first = temp_path("a.json");
        let second = temp_path("b.json");
        write_demo_file(&first, "127.0.0.1:9200".parse().unwrap()).unwrap();
        write_demo_file(&second, "127.0.0.1:9200".parse().unwrap()).unwrap();
        let secrets = |path: &Path| -> Vec<String> {
            let value: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
            value["orgs"][0]["subscriptions"].as_array().unwrap().iter().map(|s| s["secret"].as_str().unwrap().to_owned()).collect()
        };
        let (a, b) = (secrets(&first), secrets(&second));
        std::fs::remove_file(&first).unwrap();
        std::fs::remove_file(&second).unwrap();
        assert_ne!(a, b);
        assert_ne!(a[0], a[1]);
        assert!(a.iter().all(|s| s.starts_with("whsec_")));
    }
}
