//! The routing decision, pure: from the rule and what the connection's first bytes were, the
//! key it is hashed on (and by which method), or its refusal. No I/O, no clock; the connect
//! phase carries it out.

use std::net::SocketAddr;

use mqlb_config::{Distribution, Fallback, NonMqtt, Rule};

use super::inspect::Inspection;
use crate::mqtt::{self, Refusal};
use crate::outcome::Outcome;
use crate::select::Key;

/// Which method chose the key: the `method` label of `mqlb_route_decisions_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Method {
    /// The rule's own distribution.
    Rule,
    /// A CONNECT with an empty client ID, on a rule with `fallback = "five-tuple"`.
    EmptyIdFiveTuple,
    /// Bytes that are not MQTT, on a rule with `non_mqtt = "forward"`.
    NonMqttFiveTuple,
    /// A ClientHello without a server name, on an `sni` rule.
    NoSniFiveTuple,
}

impl Method {
    /// The label of a fallback method (the rule's own is its distribution's name).
    pub(crate) fn fallback_label(self) -> Option<&'static str> {
        match self {
            Method::Rule => None,
            Method::EmptyIdFiveTuple => Some("fallback-five-tuple"),
            Method::NonMqttFiveTuple => Some("non-mqtt-five-tuple"),
            Method::NoSniFiveTuple => Some("no-sni-five-tuple"),
        }
    }
}

/// What to do with a connection.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Decision<'a> {
    /// Hash `key` over the pool.
    Route { key: Key<'a>, method: Method },
    /// Send `connack` (when the client's version has a word for it), close, count `outcome`.
    Refuse {
        connack: Option<&'static [u8]>,
        outcome: Outcome,
    },
}

/// The decision, and the `reason` to count in `mqlb_mqtt_connect_errors_total` when the first
/// bytes were not a usable CONNECT with a client ID.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Verdict<'a> {
    pub decision: Decision<'a>,
    pub connect_error: Option<&'static str>,
}

/// Decides for a connection from `peer` to `local` on `rule`, given its first bytes.
pub(crate) fn decide<'a>(
    rule: &Rule,
    inspection: &'a Inspection,
    peer: SocketAddr,
    local: SocketAddr,
) -> Verdict<'a> {
    let tuple = |method| Decision::Route {
        key: tuple_key(rule.distribution, peer, local),
        method,
    };
    let rejected = |connack| Decision::Refuse {
        connack,
        outcome: Outcome::Rejected,
    };
    let (decision, connect_error) = match inspection {
        Inspection::NotRead => (tuple(Method::Rule), None),
        Inspection::Connect { client_id, .. } if !client_id.is_empty() => (
            Decision::Route {
                key: Key::ClientId(client_id),
                method: Method::Rule,
            },
            None,
        ),
        Inspection::Connect { level, .. } => (
            match rule.fallback {
                Fallback::FiveTuple => tuple(Method::EmptyIdFiveTuple),
                Fallback::Reject => rejected(mqtt::connack(*level, Refusal::IdentifierRejected)),
            },
            Some("empty_client_id"),
        ),
        // The server name is hashed as a client ID is: each name on its own backend.
        Inspection::Hello { sni: Some(name) } => (
            Decision::Route {
                key: Key::ClientId(name),
                method: Method::Rule,
            },
            None,
        ),
        Inspection::Hello { sni: None } => (tuple(Method::NoSniFiveTuple), Some("no_sni")),
        Inspection::NotMqtt(e) => (
            match rule.non_mqtt {
                NonMqtt::Forward => tuple(Method::NonMqttFiveTuple),
                NonMqtt::Refuse => rejected(None),
            },
            Some(e.reason()),
        ),
        Inspection::Unusable(fail) => (rejected(fail.refusal()), Some(fail.reason())),
    };
    Verdict {
        decision,
        connect_error,
    }
}

/// Under `tls.client_id = "cn"`: a CONNECT whose client ID is not `cn`, the subject CN of the
/// client certificate the handshake verified (none without one), is refused with CONNACK 0x85
/// (3.1.1: 2, identifier rejected), counted as `cn_mismatch`. Other first bytes are left to
/// [`decide`].
pub(crate) fn check_cn(inspection: &Inspection, cn: Option<&str>) -> Option<Verdict<'static>> {
    let Inspection::Connect { level, client_id } = inspection else {
        return None;
    };
    (cn != Some(client_id.as_str())).then(|| Verdict {
        decision: Decision::Refuse {
            connack: mqtt::connack(*level, Refusal::IdentifierRejected),
            outcome: Outcome::Rejected,
        },
        connect_error: Some("cn_mismatch"),
    })
}

/// The tuple key of a distribution; five-tuple for the client-ID one's fallbacks.
fn tuple_key(d: Distribution, peer: SocketAddr, local: SocketAddr) -> Key<'static> {
    match d {
        Distribution::SourceIp => Key::SourceIp {
            src: peer.ip(),
            dst: local.ip(),
        },
        Distribution::SourceIpProtocol => Key::SourceIpProtocol {
            src: peer.ip(),
            dst: local.ip(),
        },
        _ => Key::FiveTuple {
            src: peer,
            dst: local,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conn::inspect::InspectFail;
    use crate::mqtt::{ConnectError, ProtocolLevel};

    fn addrs() -> (SocketAddr, SocketAddr) {
        (
            SocketAddr::from(([127, 0, 0, 9], 40000)),
            SocketAddr::from(([127, 0, 0, 1], 1883)),
        )
    }

    /// An `sni` rule: a server name is hashed as a client ID is; none falls back to the
    /// five-tuple, counted `no_sni`.
    #[test]
    fn a_client_hello_routes_by_its_server_name() {
        let (peer, local) = addrs();
        let r = rule("distribution = \"sni\"\n");
        let named = Inspection::Hello {
            sni: Some("dev-1.example".into()),
        };
        assert_eq!(
            decide(&r, &named, peer, local),
            Verdict {
                decision: Decision::Route {
                    key: Key::ClientId("dev-1.example"),
                    method: Method::Rule,
                },
                connect_error: None,
            }
        );
        let anonymous = Inspection::Hello { sni: None };
        assert_eq!(
            decide(&r, &anonymous, peer, local),
            Verdict {
                decision: Decision::Route {
                    key: five_tuple(),
                    method: Method::NoSniFiveTuple,
                },
                connect_error: Some("no_sni"),
            }
        );
    }

    /// `client_id = "cn"`: only a CONNECT whose client ID is the certificate's CN passes;
    /// another ID, an empty one or no certificate gets 0x85 (5.0) or 2 (3.1.1).
    #[test]
    fn the_client_id_must_be_the_certificates_cn() {
        let connect = |level, id: &str| Inspection::Connect {
            level,
            client_id: id.to_string(),
        };
        let refused = |level| Verdict {
            decision: Decision::Refuse {
                connack: mqtt::connack(level, Refusal::IdentifierRejected),
                outcome: Outcome::Rejected,
            },
            connect_error: Some("cn_mismatch"),
        };
        let (v5, v4) = (ProtocolLevel::V5, ProtocolLevel::V311);
        assert_eq!(check_cn(&connect(v5, "dev-1"), Some("dev-1")), None);
        assert_eq!(
            check_cn(&connect(v5, "dev-2"), Some("dev-1")),
            Some(refused(v5))
        );
        assert_eq!(
            check_cn(&connect(v4, "dev-2"), Some("dev-1")),
            Some(refused(v4))
        );
        assert_eq!(check_cn(&connect(v4, ""), Some("dev-1")), Some(refused(v4)));
        assert_eq!(check_cn(&connect(v5, "dev-1"), None), Some(refused(v5)));
        assert_eq!(
            mqtt::connack(v5, Refusal::IdentifierRejected),
            Some(&[0x20, 0x03, 0x00, 0x85, 0x00][..])
        );
        assert_eq!(check_cn(&Inspection::NotRead, None), None);
    }

    fn five_tuple() -> Key<'static> {
        let (src, dst) = addrs();
        Key::FiveTuple { src, dst }
    }

    fn rule(extra: &str) -> Rule {
        let toml = format!(
            "[lb]\nadmin = \"127.0.0.1:0\"\n[[frontend]]\nname = \"f\"\nbind = \"127.0.0.1:0\"\n\
             [[pool]]\nname = \"p\"\nprobe = \"t\"\n\
             [[pool.backend]]\nid = \"b1\"\naddr = \"127.0.0.1:1\"\n\
             [[probe]]\nname = \"t\"\nport = \"traffic\"\n\
             [[rule]]\nname = \"r\"\nfrontend = \"f\"\npool = \"p\"\n{extra}"
        );
        match mqlb_config::Config::parse(&toml, "test") {
            Ok(c) => c.rules[0].clone(),
            Err(e) => panic!("test config: {e}"),
        }
    }

    fn client_id_rule(extra: &str) -> Rule {
        rule(&format!("distribution = \"mqtt-client-id\"\n{extra}"))
    }

    fn verdict<'a>(rule: &Rule, inspection: &'a Inspection) -> Verdict<'a> {
        let (peer, local) = addrs();
        decide(rule, inspection, peer, local)
    }

    fn route(key: Key<'_>, method: Method) -> Decision<'_> {
        Decision::Route { key, method }
    }

    fn rejected(connack: Option<&'static [u8]>) -> Decision<'static> {
        Decision::Refuse {
            connack,
            outcome: Outcome::Rejected,
        }
    }

    fn connect(id: &str) -> Inspection {
        Inspection::Connect {
            level: ProtocolLevel::V5,
            client_id: id.to_string(),
        }
    }

    #[test]
    fn tuple_rules_hash_their_tuple_without_reading() {
        let (peer, local) = addrs();
        let (src, dst) = (peer.ip(), local.ip());
        let cases = [
            ("", five_tuple()),
            ("distribution = \"source-ip\"\n", Key::SourceIp { src, dst }),
            (
                "distribution = \"source-ip-protocol\"\n",
                Key::SourceIpProtocol { src, dst },
            ),
        ];
        for (extra, key) in cases {
            let v = verdict(&rule(extra), &Inspection::NotRead);
            assert_eq!(v.decision, route(key, Method::Rule), "{extra}");
            assert_eq!(v.connect_error, None);
        }
    }

    #[test]
    fn a_client_id_is_the_key() {
        let inspection = connect("sensor-7");
        let v = verdict(&client_id_rule(""), &inspection);
        assert_eq!(v.decision, route(Key::ClientId("sensor-7"), Method::Rule));
        assert_eq!(v.connect_error, None);
    }

    #[test]
    fn an_empty_client_id_falls_back_or_is_refused_as_the_rule_says() {
        let empty = connect("");
        let v = verdict(&client_id_rule("fallback = \"five-tuple\"\n"), &empty);
        assert_eq!(v.decision, route(five_tuple(), Method::EmptyIdFiveTuple));
        assert_eq!(v.connect_error, Some("empty_client_id"));

        let v = verdict(&client_id_rule("fallback = \"reject\"\n"), &empty);
        let no = mqtt::connack(ProtocolLevel::V5, Refusal::IdentifierRejected);
        assert!(no.is_some());
        assert_eq!(v.decision, rejected(no));
        assert_eq!(v.connect_error, Some("empty_client_id"));
    }

    #[test]
    fn bytes_that_are_not_mqtt_are_forwarded_or_refused_as_the_rule_says() {
        let not_mqtt = Inspection::NotMqtt(ConnectError::NotMqtt("not a CONNECT"));
        let v = verdict(&client_id_rule("non_mqtt = \"forward\"\n"), &not_mqtt);
        assert_eq!(v.decision, route(five_tuple(), Method::NonMqttFiveTuple));
        assert_eq!(v.connect_error, Some("not_mqtt"));

        let v = verdict(&client_id_rule("non_mqtt = \"refuse\"\n"), &not_mqtt);
        assert_eq!(v.decision, rejected(None));
        assert_eq!(v.connect_error, Some("not_mqtt"));
    }

    /// Whatever the rule's fallbacks, an unusable CONNECT is refused.
    #[test]
    fn an_unusable_connect_is_refused_with_the_word_its_version_has() {
        let r = client_id_rule("non_mqtt = \"forward\"\nfallback = \"five-tuple\"\n");
        let cases = [
            (InspectFail::Timeout, None, "timeout"),
            (InspectFail::Eof, None, "eof"),
            (
                InspectFail::Oversized(Some(ProtocolLevel::V5)),
                mqtt::connack(ProtocolLevel::V5, Refusal::PacketTooLarge),
                "oversized",
            ),
            (
                InspectFail::Parse(ConnectError::UnsupportedLevel(9), None),
                mqtt::connack(ProtocolLevel::V311, Refusal::UnsupportedVersion),
                "unsupported_level",
            ),
            (
                InspectFail::Parse(ConnectError::Malformed("bad"), Some(ProtocolLevel::V311)),
                mqtt::connack(ProtocolLevel::V311, Refusal::Malformed),
                "malformed",
            ),
        ];
        for (fail, connack, reason) in cases {
            let inspection = Inspection::Unusable(fail);
            let v = verdict(&r, &inspection);
            assert_eq!(v.decision, rejected(connack), "{reason}");
            assert_eq!(v.connect_error, Some(reason));
        }
    }

    #[test]
    fn fallback_methods_have_their_labels() {
        assert_eq!(Method::Rule.fallback_label(), None);
        assert_eq!(
            Method::EmptyIdFiveTuple.fallback_label(),
            Some("fallback-five-tuple")
        );
        assert_eq!(
            Method::NonMqttFiveTuple.fallback_label(),
            Some("non-mqtt-five-tuple")
        );
    }
}
