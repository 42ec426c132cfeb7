//! `mqlb import azure`: an Azure Load Balancer, as `az network lb show` prints it or as the
//! `Microsoft.Network/loadBalancers` resource of an ARM template, turned into an mqlb config.
//!
//! mqlb's model is Azure's (README, "Configuration reference"), so most settings map one to
//! one: a frontend IP configuration and a rule's frontend port become a `[[frontend]]`, a
//! backend pool and a rule's backend port a `[[pool]]` with one `[[pool.backend]]` per address,
//! a probe a `[[probe]]`, a load-balancing rule a `[[rule]]`. What has no mqlb counterpart
//! (floating IP, HA ports, UDP, outbound and inbound NAT rules, HTTPS probes, NIC-based pool
//! members whose addresses the export does not hold) is listed as a warning, never dropped
//! silently. Pure: JSON in, TOML text and warnings out; the CLI reads and prints.
//!
//! `az` prints each object's properties flat (`"probes": [{"name", "port", ...}]`), an ARM
//! template nests them under `"properties"`; references are resource IDs
//! (`.../probes/NAME`) or template expressions (`[resourceId('...', 'lb', 'NAME')]`). Both
//! shapes are read.

use std::collections::BTreeMap;
use std::net::IpAddr;

use anyhow::{bail, Context};
use serde_json::Value;

/// The converted configuration and what could not be carried over.
#[derive(Debug)]
pub struct Imported {
    pub toml: String,
    pub warnings: Vec<String>,
}

/// `key` of an Azure object, flat (`az`) or under `properties` (ARM).
fn field<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    v.get(key)
        .or_else(|| v.get("properties").and_then(|p| p.get(key)))
}

fn list<'a>(v: &'a Value, key: &str) -> &'a [Value] {
    field(v, key)
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

fn text<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    field(v, key).and_then(Value::as_str)
}

fn number(v: &Value, key: &str) -> Option<u64> {
    field(v, key).and_then(|n| n.as_u64().or_else(|| n.as_str()?.parse().ok()))
}

fn flag(v: &Value, key: &str) -> bool {
    field(v, key).and_then(Value::as_bool).unwrap_or(false)
}

/// The last name of a reference: `.../frontendIPConfigurations/fe` or an ARM expression whose
/// last string literal ends with it (`[resourceId('...', variables('lb'), 'fe')]`).
fn last_name(s: &str) -> String {
    let s = s.trim();
    let inner = if s.starts_with('[') {
        s.rsplit('\'').nth(1).unwrap_or(s)
    } else {
        s
    };
    inner
        .trim_end_matches('/')
        .rsplit('/')
        .next()
        .unwrap_or(inner)
        .to_string()
}

/// The name a `{"id": ...}` reference points at.
fn ref_name(v: &Value, key: &str) -> Option<String> {
    field(v, key)
        .and_then(|r| r.get("id"))
        .and_then(Value::as_str)
        .map(last_name)
}

/// An mqlb name (1-64 of `A-Z a-z 0-9 - _ .`) for an Azure name, which may hold other
/// characters or be a template expression.
fn mqlb_name(s: &str) -> String {
    let base = if s.starts_with('[') {
        last_name(s)
    } else {
        s.to_string()
    };
    let mut n: String = base
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '-'
            }
        })
        .take(64)
        .collect();
    if n.is_empty() {
        n.push('x');
    }
    n
}

fn name_of(v: &Value) -> String {
    mqlb_name(v.get("name").and_then(Value::as_str).unwrap_or(""))
}

/// A TOML basic string.
fn q(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                out += &format!("\\u{:04X}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn socket(ip: &str, port: u64) -> String {
    match ip.parse::<IpAddr>() {
        Ok(IpAddr::V6(v6)) => format!("[{v6}]:{port}"),
        _ => format!("{ip}:{port}"),
    }
}

/// Finds the load balancer in a document: the object itself (`az network lb show`), the one
/// element of a list (`az network lb list`), or the one `Microsoft.Network/loadBalancers`
/// resource of an ARM template.
fn find_lb(doc: &Value) -> anyhow::Result<&Value> {
    let is_lb = |v: &Value| {
        v.get("type")
            .and_then(Value::as_str)
            .is_some_and(|t| t.eq_ignore_ascii_case("Microsoft.Network/loadBalancers"))
            || field(v, "frontendIPConfigurations").is_some()
    };
    let candidates: Vec<&Value> = match doc {
        Value::Array(items) => items.iter().filter(|v| is_lb(v)).collect(),
        Value::Object(_) if doc.get("resources").is_some() => list(doc, "resources")
            .iter()
            .filter(|v| {
                v.get("type")
                    .and_then(Value::as_str)
                    .is_some_and(|t| t.eq_ignore_ascii_case("Microsoft.Network/loadBalancers"))
            })
            .collect(),
        Value::Object(_) if is_lb(doc) => vec![doc],
        _ => Vec::new(),
    };
    match candidates.as_slice() {
        [one] => Ok(one),
        [] => bail!("no Microsoft.Network/loadBalancers in the document (expected `az network lb show` output or an ARM template)"),
        many => bail!(
            "{} load balancers in the document ({}); export one with `az network lb show`",
            many.len(),
            many.iter().map(|v| name_of(v)).collect::<Vec<_>>().join(", ")
        ),
    }
}

struct ProbeOut {
    toml: String,
}

/// One probe as TOML; a protocol mqlb cannot probe (HTTPS) is probed over TCP, with a warning.
fn probe(p: &Value, warnings: &mut Vec<String>) -> ProbeOut {
    let name = name_of(p);
    let protocol = text(p, "protocol").unwrap_or("Tcp");
    let port = number(p, "port").unwrap_or(u64::from(mqlb_config::DEFAULT_PROBE_PORT));
    let interval = number(p, "intervalInSeconds").unwrap_or(5).max(1);
    // probeThreshold is the newer setting (both directions); numberOfProbes the older one.
    let threshold = number(p, "probeThreshold")
        .or_else(|| number(p, "numberOfProbes"))
        .unwrap_or(1)
        .max(1);
    let mut t = format!("[[probe]]\nname = {}\n", q(&name));
    match protocol.to_ascii_lowercase().as_str() {
        "http" => {
            t += "protocol = \"http\"\n";
            t += &format!("path = {}\n", q(text(p, "requestPath").unwrap_or("/")));
        }
        "https" => {
            warnings.push(format!(
                "probe {name}: HTTPS probes are not carried (mqlb's tls and mqtts probes verify \
                 the member's certificate, so they need the CA in pool.tls, which the export does \
                 not have); probing TCP port {port} instead"
            ));
            t += "protocol = \"tcp\"\n";
        }
        "tcp" => t += "protocol = \"tcp\"\n",
        other => {
            warnings.push(format!(
                "probe {name}: protocol {other:?} unknown; probing TCP port {port} instead"
            ));
            t += "protocol = \"tcp\"\n";
        }
    }
    // Azure has no probe timeout; mqlb's (2 s by default) must not exceed the interval.
    let timeout = if interval < 2 {
        format!("timeout = \"{interval}s\"\n")
    } else {
        String::new()
    };
    t += &format!("port = {port}\ninterval = \"{interval}s\"\n{timeout}threshold = {threshold}\n");
    ProbeOut { toml: t }
}

/// A backend pool's members with an address: (id, IP, drained).
fn pool_members(pool: &Value, warnings: &mut Vec<String>) -> Vec<(String, String, bool)> {
    let name = name_of(pool);
    let mut out = Vec::new();
    for (i, a) in list(pool, "loadBalancerBackendAddresses")
        .iter()
        .enumerate()
    {
        let Some(ip) = text(a, "ipAddress") else {
            warnings.push(format!(
                "pool {name}: backend address {} has no ipAddress (a NIC or frontend reference); add it by hand",
                a.get("name").and_then(Value::as_str).unwrap_or("?")
            ));
            continue;
        };
        let id = a
            .get("name")
            .and_then(Value::as_str)
            .map(mqlb_name)
            .unwrap_or_else(|| format!("{name}-{i}"));
        // adminState Down: Azure sends it no new connections, as mqlb's drain does.
        let down = text(a, "adminState").is_some_and(|s| s.eq_ignore_ascii_case("Down"));
        out.push((id, ip.to_string(), down));
    }
    let nics = list(pool, "backendIPConfigurations").len();
    if nics > 0 {
        warnings.push(format!(
            "pool {name}: {nics} member(s) are NIC IP configurations, whose addresses the export does not hold; add them as [[pool.backend]] by hand"
        ));
    }
    out
}

/// A rule that can be carried: where it listens, which pool and port it sends to, how.
struct RuleIn {
    name: String,
    frontend: String,
    frontend_port: u64,
    pool: String,
    backend_port: u64,
    probe: Option<String>,
    distribution: &'static str,
    idle_minutes: u64,
    tcp_reset: bool,
}

fn rule_in(r: &Value, warnings: &mut Vec<String>) -> Option<RuleIn> {
    let name = name_of(r);
    let protocol = text(r, "protocol").unwrap_or("Tcp");
    let frontend_port = number(r, "frontendPort").unwrap_or(0);
    let backend_port = number(r, "backendPort").unwrap_or(frontend_port);
    if protocol.eq_ignore_ascii_case("All") || (frontend_port == 0 && backend_port == 0) {
        warnings.push(format!(
            "rule {name}: HA ports (protocol All, port 0) are not supported: mqlb balances one TCP port per rule; rule skipped"
        ));
        return None;
    }
    if protocol.eq_ignore_ascii_case("Udp") {
        warnings.push(format!(
            "rule {name}: UDP is not supported (mqlb balances TCP); rule skipped"
        ));
        return None;
    }
    if flag(r, "enableFloatingIP") {
        warnings.push(format!(
            "rule {name}: floating IP (direct server return) is not supported: the backends see mqlb's address and their own port; carried without it"
        ));
    }
    let distribution = match text(r, "loadDistribution").unwrap_or("Default") {
        d if d.eq_ignore_ascii_case("Default") => "five-tuple",
        d if d.eq_ignore_ascii_case("SourceIP") => "source-ip",
        d if d.eq_ignore_ascii_case("SourceIPProtocol") => "source-ip-protocol",
        other => {
            warnings.push(format!(
                "rule {name}: loadDistribution {other:?} unknown; five-tuple used"
            ));
            "five-tuple"
        }
    };
    let (Some(frontend), Some(pool)) = (
        ref_name(r, "frontendIPConfiguration"),
        ref_name(r, "backendAddressPool"),
    ) else {
        warnings.push(format!(
            "rule {name}: no frontendIPConfiguration or backendAddressPool reference; rule skipped"
        ));
        return None;
    };
    Some(RuleIn {
        name,
        frontend: mqlb_name(&frontend),
        frontend_port,
        pool: mqlb_name(&pool),
        backend_port,
        probe: ref_name(r, "probe").map(|p| mqlb_name(&p)),
        distribution,
        idle_minutes: number(r, "idleTimeoutInMinutes").unwrap_or(4).max(1),
        tcp_reset: flag(r, "enableTcpReset"),
    })
}

/// Converts a parsed Azure document.
pub fn convert(doc: &Value) -> anyhow::Result<Imported> {
    let lb = find_lb(doc)?;
    let lb_name = name_of(lb);
    let mut warnings = Vec::new();

    for (key, what) in [
        (
            "outboundRules",
            "outbound rule(s) (mqlb does no outbound SNAT)",
        ),
        ("inboundNatRules", "inbound NAT rule(s)"),
        ("inboundNatPools", "inbound NAT pool(s)"),
    ] {
        let n = list(lb, key).len();
        if n > 0 {
            warnings.push(format!("{n} {what} not carried"));
        }
    }

    // Frontend IP configurations by name: their address, when the export holds one.
    let mut frontend_ips = BTreeMap::new();
    for f in list(lb, "frontendIPConfigurations") {
        let name = name_of(f);
        let ip = match text(f, "privateIPAddress").filter(|s| !s.is_empty()) {
            Some(ip) => ip.to_string(),
            None => {
                let public = ref_name(f, "publicIPAddress").unwrap_or_else(|| "?".into());
                warnings.push(format!(
                    "frontend {name}: public IP {public}'s address is not in the export; bound to 0.0.0.0 (put this machine's address there)"
                ));
                "0.0.0.0".to_string()
            }
        };
        frontend_ips.insert(name, ip);
    }

    let mut probes = BTreeMap::new();
    for p in list(lb, "probes") {
        probes.insert(name_of(p), probe(p, &mut warnings));
    }

    let mut pools = BTreeMap::new();
    for p in list(lb, "backendAddressPools") {
        let members = pool_members(p, &mut warnings);
        pools.insert(name_of(p), members);
    }

    let rules: Vec<RuleIn> = list(lb, "loadBalancingRules")
        .iter()
        .filter_map(|r| rule_in(r, &mut warnings))
        .collect();
    if rules.is_empty() {
        bail!("load balancer {lb_name}: no load-balancing rule mqlb can carry");
    }

    // One mqlb pool per (Azure pool, backend port, probe): mqlb's backends carry their port and
    // a pool has one probe. Named after the Azure pool when it needs only one.
    let mut pool_keys: Vec<(String, u64, Option<String>)> = Vec::new();
    for r in &rules {
        let key = (r.pool.clone(), r.backend_port, r.probe.clone());
        if !pool_keys.contains(&key) {
            pool_keys.push(key);
        }
    }
    let pool_name = |key: &(String, u64, Option<String>)| -> String {
        let same_pool: Vec<_> = pool_keys.iter().filter(|k| k.0 == key.0).collect();
        if same_pool.len() == 1 {
            return key.0.clone();
        }
        let same_port = same_pool.iter().filter(|k| k.1 == key.1).count();
        match (&key.2, same_port) {
            (Some(p), n) if n > 1 => mqlb_name(&format!("{}-{}-{p}", key.0, key.1)),
            _ => mqlb_name(&format!("{}-{}", key.0, key.1)),
        }
    };

    let mut out = String::new();
    out += "[lb]\nadmin = \"127.0.0.1:9883\"\n";

    let mut frontends_done: Vec<String> = Vec::new();
    let mut rules_toml = String::new();
    let mut frontends_toml = String::new();
    for r in &rules {
        let fe_name = mqlb_name(&format!("{}-{}", r.frontend, r.frontend_port));
        if frontends_done.contains(&fe_name) {
            warnings.push(format!(
                "rule {}: frontend {} port {} is already taken by another rule; rule skipped",
                r.name, r.frontend, r.frontend_port
            ));
            continue;
        }
        let Some(ip) = frontend_ips.get(&r.frontend) else {
            warnings.push(format!(
                "rule {}: no frontend IP configuration {:?}; rule skipped",
                r.name, r.frontend
            ));
            continue;
        };
        frontends_done.push(fe_name.clone());
        frontends_toml += &format!(
            "\n[[frontend]]\nname = {}\nbind = {}\n",
            q(&fe_name),
            q(&socket(ip, r.frontend_port))
        );
        let key = (r.pool.clone(), r.backend_port, r.probe.clone());
        rules_toml += &format!(
            "\n[[rule]]\nname = {}\nfrontend = {}\npool = {}\ndistribution = {}\nidle_timeout = \"{}m\"\nreset_on_idle = {}\n",
            q(&r.name),
            q(&fe_name),
            q(&pool_name(&key)),
            q(r.distribution),
            r.idle_minutes,
            r.tcp_reset
        );
    }
    out += &frontends_toml;

    let mut probes_used = Vec::new();
    for key in &pool_keys {
        let (az_pool, port, probe) = key;
        let name = pool_name(key);
        out += &format!("\n[[pool]]\nname = {}\n", q(&name));
        match probe {
            Some(p) if probes.contains_key(p) => {
                out += &format!("probe = {}\n", q(p));
                if !probes_used.contains(p) {
                    probes_used.push(p.clone());
                }
            }
            Some(p) => {
                warnings.push(format!(
                    "pool {name}: probe {p:?} is not in the export; mqlb's default probe (TCP 8883) applies"
                ));
            }
            None => {
                warnings.push(format!(
                    "pool {name}: its rule has no probe; mqlb's default probe (TCP 8883 every 5 s) applies"
                ));
            }
        }
        match pools.get(az_pool) {
            None => warnings.push(format!(
                "pool {name}: backend pool {az_pool:?} is not in the export; it has no backends"
            )),
            Some(members) => {
                for (id, ip, down) in members {
                    out += &format!(
                        "[[pool.backend]]\nid = {}\naddr = {}\n",
                        q(id),
                        q(&socket(ip, *port))
                    );
                    if *down {
                        out += "drain = true\n";
                    }
                }
            }
        }
    }
    for p in &probes_used {
        if let Some(pr) = probes.get(p) {
            out += "\n";
            out += &pr.toml;
        }
    }
    out += &rules_toml;
    let mut head = String::new();
    head += &format!(
        "# Imported from Azure Load Balancer {lb_name} by `mqlb import azure`; check it with\n\
         # `mqlb check-config`. Not carried:{}\n",
        if warnings.is_empty() { " nothing." } else { "" }
    );
    for w in &warnings {
        head += &format!("#   - {w}\n");
    }
    head += "\n";
    Ok(Imported {
        toml: head + &out,
        warnings,
    })
}

/// Parses and converts the text of a JSON file; `origin` names it in errors.
pub fn convert_text(json: &str, origin: &str) -> anyhow::Result<Imported> {
    let doc: Value = serde_json::from_str(json).with_context(|| format!("{origin}: not JSON"))?;
    convert(&doc).with_context(|| origin.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(t: &Imported) -> mqlb_config::Config {
        match mqlb_config::Config::parse(&t.toml, "imported") {
            Ok(c) => c,
            Err(e) => panic!("{e}\n{}", t.toml),
        }
    }

    fn az_lb() -> Value {
        json!({
            "name": "mqtt-lb",
            "type": "Microsoft.Network/loadBalancers",
            "frontendIPConfigurations": [
                {"name": "fe", "privateIPAddress": "10.0.0.10", "privateIPAllocationMethod": "Static"}
            ],
            "backendAddressPools": [{
                "name": "brokers",
                "loadBalancerBackendAddresses": [
                    {"name": "vm1", "ipAddress": "10.0.0.4"},
                    {"name": "vm2", "ipAddress": "10.0.0.5", "adminState": "Down"}
                ]
            }],
            "probes": [{
                "name": "hp", "protocol": "Http", "port": 8080, "requestPath": "/healthz",
                "intervalInSeconds": 15, "probeThreshold": 2
            }],
            "loadBalancingRules": [{
                "name": "mqtt",
                "frontendIPConfiguration": {"id": "/subscriptions/s/resourceGroups/g/providers/Microsoft.Network/loadBalancers/mqtt-lb/frontendIPConfigurations/fe"},
                "backendAddressPool": {"id": "/subscriptions/s/resourceGroups/g/providers/Microsoft.Network/loadBalancers/mqtt-lb/backendAddressPools/brokers"},
                "probe": {"id": "/subscriptions/s/resourceGroups/g/providers/Microsoft.Network/loadBalancers/mqtt-lb/probes/hp"},
                "protocol": "Tcp", "frontendPort": 1883, "backendPort": 1883,
                "idleTimeoutInMinutes": 30, "enableTcpReset": true, "enableFloatingIP": false,
                "loadDistribution": "SourceIP"
            }],
            "outboundRules": []
        })
    }

    #[test]
    fn az_show_output_maps_every_setting() {
        let out = convert(&az_lb()).expect("converts");
        assert!(out.warnings.is_empty(), "{:?}", out.warnings);
        let cfg = parse(&out);
        assert_eq!(cfg.frontends[0].bind.to_string(), "10.0.0.10:1883");
        let pool = &cfg.pools[0];
        assert_eq!(pool.name, "brokers");
        assert_eq!(pool.backends.len(), 2);
        assert_eq!(pool.backends[0].addr.to_string(), "10.0.0.4:1883");
        assert!(!pool.backends[0].drain && pool.backends[1].drain);
        assert_eq!(pool.probe.port, mqlb_config::ProbePort::Fixed(8080));
        assert_eq!(
            pool.probe.protocol,
            mqlb_config::ProbeProtocol::Http {
                path: "/healthz".into()
            }
        );
        assert_eq!(pool.probe.interval, std::time::Duration::from_secs(15));
        assert_eq!(pool.probe.down_threshold.get(), 2);
        let rule = &cfg.rules[0];
        assert_eq!(rule.distribution, mqlb_config::Distribution::SourceIp);
        assert_eq!(rule.idle_timeout, std::time::Duration::from_secs(1800));
        assert!(rule.reset_on_idle);
    }

    #[test]
    fn what_cannot_be_carried_is_warned_about() {
        let mut lb = az_lb();
        let rules = lb["loadBalancingRules"].as_array_mut().expect("rules");
        rules[0]["enableFloatingIP"] = json!(true);
        let mut udp = rules[0].clone();
        udp["name"] = json!("dns");
        udp["protocol"] = json!("Udp");
        let mut ha = rules[0].clone();
        ha["name"] = json!("all");
        ha["protocol"] = json!("All");
        ha["frontendPort"] = json!(0);
        ha["backendPort"] = json!(0);
        rules.push(udp);
        rules.push(ha);
        lb["outboundRules"] = json!([{"name": "out"}]);
        lb["probes"][0]["protocol"] = json!("Https");
        let out = convert(&lb).expect("converts");
        let all = out.warnings.join("\n");
        for what in ["floating IP", "UDP", "HA ports", "outbound", "HTTPS probes"] {
            assert!(all.contains(what), "no warning about {what}: {all}");
        }
        assert_eq!(out.warnings.len(), 5, "{all}");
        let cfg = parse(&out);
        assert_eq!(cfg.rules.len(), 1, "only the TCP rule is carried");
        assert_eq!(cfg.pools[0].probe.protocol, mqlb_config::ProbeProtocol::Tcp);
    }

    #[test]
    fn arm_template_properties_and_expressions_are_read() {
        let doc = json!({
            "$schema": "https://schema.management.azure.com/schemas/2019-04-01/deploymentTemplate.json#",
            "resources": [
                {"type": "Microsoft.Network/publicIPAddresses", "name": "pip"},
                {
                    "type": "Microsoft.Network/loadBalancers",
                    "name": "[variables('lbName')]",
                    "properties": {
                        "frontendIPConfigurations": [{"name": "LoadBalancerFrontEnd", "properties": {
                            "publicIPAddress": {"id": "[resourceId('Microsoft.Network/publicIPAddresses', 'pip')]"}}}],
                        "backendAddressPools": [{"name": "pool", "properties": {
                            "loadBalancerBackendAddresses": [{"name": "a", "properties": {"ipAddress": "10.1.0.4"}}]}}],
                        "probes": [{"name": "tcp", "properties": {"protocol": "Tcp", "port": 1883,
                            "intervalInSeconds": 5, "numberOfProbes": 3}}],
                        "loadBalancingRules": [{"name": "r", "properties": {
                            "frontendIPConfiguration": {"id": "[resourceId('Microsoft.Network/loadBalancers/frontendIPConfigurations', variables('lbName'), 'LoadBalancerFrontEnd')]"},
                            "backendAddressPool": {"id": "[concat(resourceId('Microsoft.Network/loadBalancers', variables('lbName')), '/backendAddressPools/pool')]"},
                            "probe": {"id": "[resourceId('Microsoft.Network/loadBalancers/probes', variables('lbName'), 'tcp')]"},
                            "protocol": "Tcp", "frontendPort": 1883, "backendPort": 11883,
                            "loadDistribution": "SourceIPProtocol"}}]
                    }
                }
            ]
        });
        let out = convert(&doc).expect("converts");
        assert_eq!(out.warnings.len(), 1, "{:?}", out.warnings);
        assert!(out.warnings[0].contains("public IP pip"));
        let cfg = parse(&out);
        assert_eq!(cfg.frontends[0].bind.to_string(), "0.0.0.0:1883");
        assert_eq!(cfg.pools[0].backends[0].addr.to_string(), "10.1.0.4:11883");
        assert_eq!(cfg.pools[0].probe.down_threshold.get(), 3);
        assert_eq!(
            cfg.rules[0].distribution,
            mqlb_config::Distribution::SourceIpProtocol
        );
        assert_eq!(
            cfg.rules[0].idle_timeout,
            std::time::Duration::from_secs(240)
        );
    }

    #[test]
    fn one_azure_pool_on_two_ports_is_two_mqlb_pools() {
        let mut lb = az_lb();
        let rules = lb["loadBalancingRules"].as_array_mut().expect("rules");
        let mut tls = rules[0].clone();
        tls["name"] = json!("mqtts");
        tls["frontendPort"] = json!(8883);
        tls["backendPort"] = json!(8883);
        rules.push(tls);
        let cfg = parse(&convert(&lb).expect("converts"));
        let names: Vec<&str> = cfg.pools.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["brokers-1883", "brokers-8883"]);
        assert_eq!(cfg.rules[1].pool, "brokers-8883");
        assert_eq!(cfg.pools[1].backends[1].addr.to_string(), "10.0.0.5:8883");
    }

    #[test]
    fn references_and_names() {
        assert_eq!(last_name("/a/b/probes/hp"), "hp");
        assert_eq!(
            last_name("[resourceId('Microsoft.Network/x', variables('lb'), 'fe')]"),
            "fe"
        );
        assert_eq!(mqlb_name("my pool (1)"), "my-pool--1-");
        assert!(convert(&json!({"resources": []})).is_err());
    }
}
