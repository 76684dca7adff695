//! The demo's provisioning file: one org with the two demo numbers, each on its own
//! WABA, and two subscriptions pointing at the verifying subscriber, one for every
//! event type and one for a list of message events. The ids are fixed, so writing the
//! file again and applying it to the same database rotates the secrets and changes
//! nothing else.

use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use anyhow::{Context, bail, ensure};
use rand::Rng;
use reach_shared::provision::ProvisioningFile;
use reach_shared::signing::WebhookSecret;
use secrecy::{ExposeSecret, SecretString};
use serde_json::json;
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
    let wabas: Vec<_> = demo_numbers()
        .into_iter()
        .map(|number| {
            json!({
                "waba_id": number.waba_id,
                "access_token": format!("demo-token-{}", hex::encode(rand::rng().random::<[u8; 16]>())),
                "phone_numbers": [{
                    "phone_number_id": number.phone_number_id,
                    "display_phone_number": number.display_phone_number,
                    "mps": 80,
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
    let text = serde_json::to_string_pretty(&file).context("failed to serialise the provisioning file")?;
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
