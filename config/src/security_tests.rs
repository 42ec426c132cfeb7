//! Issue 13's refusals at load: token files, non-loopback binds without a token, the example
//! secret off loopback.

use super::*;
use std::sync::atomic::{AtomicUsize, Ordering};

/// A file holding `text`, removed on drop.
struct TokenFile(std::path::PathBuf);

impl TokenFile {
    fn new(text: &str) -> TokenFile {
        static N: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "mqlb-config-token-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&path, text).expect("write token file");
        TokenFile(path)
    }

    fn key(&self, key: &str) -> String {
        format!("{key} = {:?}\n", self.0.display().to_string())
    }
}

impl Drop for TokenFile {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.0) {
            eprintln!("{}: {e}", self.0.display());
        }
    }
}

const TOKEN: &str = "0123456789abcdef-token";

fn keys(text: &str) -> Vec<String> {
    match Config::parse(text, "t.toml") {
        Err(ConfigError::Invalid { problems, .. }) => problems.into_iter().map(|p| p.key).collect(),
        other => panic!("expected validation problems, got {other:?}"),
    }
}

fn lb(lines: &str) -> String {
    format!("[lb]\n{lines}")
}

fn broker(lines: &str) -> String {
    format!("[[broker]]\nid = \"b1\"\nmqtt = \"127.0.0.1:18831\"\n{lines}")
}

#[test]
fn the_admin_token_is_read_at_load_and_prints_masked() {
    let f = TokenFile::new(&format!("{TOKEN}\n"));
    let c = Config::parse(&lb(&f.key("admin_token_file")), "t.toml").expect("valid");
    let token = c.lb.admin_token.as_ref().expect("a token");
    assert_eq!(
        token.expose(),
        TOKEN.as_bytes(),
        "the newline is not part of it"
    );
    assert!(!format!("{c:?}").contains(TOKEN), "Debug masks it");
    let c = Config::parse(&broker(&f.key("http_token_file")), "t.toml").expect("valid");
    assert_eq!(
        c.brokers[0].http_token.as_ref().map(Secret::expose),
        Some(TOKEN.as_bytes())
    );
    assert_eq!(Config::parse("", "t").expect("valid").lb.admin_token, None);
}

#[test]
fn a_missing_empty_or_short_token_file_is_an_error_naming_the_key() {
    let empty = TokenFile::new(" \n");
    let short = TokenFile::new("short\n");
    let spaced = TokenFile::new("0123456789 abcdef-token\n");
    let missing = "admin_token_file = \"/definitely/not/here.token\"\n";
    for text in [
        missing.to_string(),
        empty.key("admin_token_file"),
        short.key("admin_token_file"),
        spaced.key("admin_token_file"),
    ] {
        assert_eq!(keys(&lb(&text)), ["lb.admin_token_file"], "{text}");
    }
    assert_eq!(
        keys(&broker(&empty.key("http_token_file"))),
        ["broker[0].http_token_file"]
    );
}

#[test]
fn a_non_loopback_admin_or_broker_http_needs_a_token() {
    let f = TokenFile::new(TOKEN);
    for admin in ["0.0.0.0:9883", "10.0.0.1:9883", "[::]:9883"] {
        let text = lb(&format!("admin = \"{admin}\"\n"));
        assert_eq!(keys(&text), ["lb.admin"], "{admin}");
        let text = lb(&format!(
            "admin = \"{admin}\"\n{}",
            f.key("admin_token_file")
        ));
        assert!(Config::parse(&text, "t").is_ok(), "{admin} with a token");
    }
    let http = "http = \"0.0.0.0:18871\"\n";
    assert_eq!(keys(&broker(http)), ["broker[0].http"]);
    let with = format!("{http}{}", f.key("http_token_file"));
    assert!(Config::parse(&broker(&with), "t").is_ok());
    // Loopback needs none: the quick start.
    assert!(Config::parse(&broker("http = \"[::1]:18871\"\n"), "t").is_ok());
    assert!(Config::parse(&lb("admin = \"127.0.0.2:9883\"\n"), "t").is_ok());
}

#[test]
fn the_example_secret_is_refused_when_a_mesh_ha_admin_or_http_bind_is_not_loopback() {
    let f = TokenFile::new(TOKEN);
    let secret = |s: &str| format!("[cluster]\nsecret = \"{s}\"\n");
    let example = secret(EXAMPLE_SECRET);
    let exposed = [
        broker("mesh = \"0.0.0.0:18861\"\n"),
        format!(
            "{}[[haserver]]\nid = \"ha1\"\nlisten = \"10.0.0.1:8082\"\n",
            broker("")
        ),
        format!(
            "{}{}",
            lb(&format!(
                "admin = \"0.0.0.0:9883\"\n{}",
                f.key("admin_token_file")
            )),
            broker("")
        ),
        broker(&format!(
            "http = \"0.0.0.0:18871\"\n{}",
            f.key("http_token_file")
        )),
    ];
    for rest in &exposed {
        assert_eq!(
            keys(&format!("{example}{rest}")),
            ["cluster.secret"],
            "{rest}"
        );
        let own = format!("{}{rest}", secret("a-secret-of-our-own"));
        assert!(Config::parse(&own, "t").is_ok(), "{own}");
    }
    // On loopback it is the quick start's; MQTT listeners off loopback do not expose it.
    let mqtt_only = format!(
        "{example}[[broker]]\nid = \"b1\"\nmqtt = \"0.0.0.0:18831\"\nmesh = \"127.0.0.1:18861\"\n\
         [[frontend]]\nname = \"f\"\nbind = \"0.0.0.0:1883\"\n"
    );
    assert!(Config::parse(&mqtt_only, "t").is_ok());
    let builtin = Config::builtin().expect("mqlb up's default still loads");
    assert_eq!(
        builtin.cluster.secret.as_ref().map(Secret::expose),
        Some(EXAMPLE_SECRET.as_bytes())
    );
}
