use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use reach_meta_sim::{RuleOutcome, SimArgs};
use secrecy::ExposeSecret;

/// Writes `contents` to a file of its own under the temporary directory.
fn temp_file(name: &str, contents: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    let path = std::env::temp_dir().join(format!("reach-meta-sim-{}-{nanos}-{name}", std::process::id()));
    std::fs::write(&path, contents).unwrap();
    path
}

const PROVISIONING: &str = r#"{"orgs":[{"id":"0194f2a4-5a43-7c2e-9d43-1c1f0c9f6a01","slug":"acme","name":"Acme","wabas":[
  {"waba_id":"100000000000001","access_token":"token-a","phone_numbers":[
    {"phone_number_id":"200000000000001","display_phone_number":"+1 555-000-1111","mps":20,"quality_rating":"GREEN"},
    {"phone_number_id":"200000000000002","display_phone_number":"+1 555-000-3333"}]}],
  "subscriptions":[]}]}"#;

#[test]
fn args_read_provisioning_and_rules_files() {
    let provisioning = temp_file("provisioning.json", PROVISIONING);
    let rules = temp_file("rules.json", r#"{"rules":[{"to":"15550002222","kind":"timeout"}]}"#);
    let args = SimArgs::try_parse_from([
        "reach-meta-sim",
        "--addr",
        "127.0.0.1:0",
        "--provisioning-file",
        provisioning.to_str().unwrap(),
        "--rules-file",
        rules.to_str().unwrap(),
        "--webhook-url",
        "http://127.0.0.1:9101/webhooks/whatsapp",
        "--app-secret",
        "app-secret",
        "--pair-interval-ms",
        "0",
        "--latency-min-ms",
        "5",
        "--latency-max-ms",
        "10",
    ])
    .unwrap();

    let settings = args.into_settings().unwrap();
    assert_eq!(settings.numbers.len(), 2);
    assert_eq!(settings.numbers[0].mps, 20);
    assert_eq!(settings.numbers[1].mps, 80, "the provisioning file's default mps");
    assert_eq!(settings.numbers[1].waba_id, "100000000000001");
    assert_eq!(settings.numbers[1].access_token.expose_secret(), "token-a");
    assert_eq!(settings.pair_interval, Duration::ZERO);
    assert_eq!(settings.latency_max, Duration::from_millis(10));
    assert_eq!(settings.rules[0].outcome, RuleOutcome::Timeout);

    let webhook = settings.webhook.unwrap();
    assert_eq!(webhook.url.as_str(), "http://127.0.0.1:9101/webhooks/whatsapp");
    assert_eq!(webhook.app_secret.expose_secret(), "app-secret");
    for path in [provisioning, rules] {
        std::fs::remove_file(path).unwrap();
    }
}

#[test]
fn args_validate_combinations() {
    let provisioning = temp_file("provisioning.json", PROVISIONING);
    let file = provisioning.to_str().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&["--webhook-url", "http://127.0.0.1:1/webhooks/whatsapp"], "REACH_SIM_APP_SECRET"),
        (&["--latency-min-ms", "50", "--latency-max-ms", "10"], "latency min 50 ms exceeds"),
        (&["--read-ratio", "1.5"], "read ratio 1.5 is outside 0 to 1"),
    ];
    for (extra, expected) in cases {
        let mut argv = vec!["reach-meta-sim", "--provisioning-file", file];
        argv.extend_from_slice(extra);
        let error = SimArgs::try_parse_from(&argv).unwrap().into_settings().unwrap_err();
        let text = format!("{error:#}");
        assert!(text.contains(expected), "{extra:?}: {text}");
    }

    let overridden = SimArgs::try_parse_from([
        "reach-meta-sim",
        "--provisioning-file",
        file,
        "--mps-override",
        "5000",
        "--webhook-url",
        "",
    ])
    .unwrap()
    .into_settings()
    .unwrap();
    assert!(overridden.numbers.iter().all(|number| number.mps == 5000));
    assert!(overridden.webhook.is_none(), "an empty webhook URL sends no webhooks");
    std::fs::remove_file(provisioning).unwrap();
}
