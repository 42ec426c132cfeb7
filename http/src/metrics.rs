//! Prometheus for every mqlb server: the text exposition of a registry and the standard
//! process series, written once for the LB, the broker and the HA server.

use prometheus::{Encoder, Registry, TextEncoder};

/// The Prometheus text format's content type, with its version: Prometheus 3 refuses a scrape
/// without one by default.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The Prometheus text exposition of every metric in `registry`.
pub fn render(registry: &Registry) -> Result<String, prometheus::Error> {
    let mut buf = Vec::new();
    TextEncoder::new().encode(&registry.gather(), &mut buf)?;
    String::from_utf8(buf).map_err(|e| prometheus::Error::Msg(e.to_string()))
}

/// Registers the standard process_* series (CPU seconds, resident memory, open descriptors,
/// start time; Linux: procfs) on `registry`, the names every dashboard already knows. One per
/// registry: tests run several servers in one process, and each registry reports the process.
pub fn register_process(registry: &Registry) -> Result<(), prometheus::Error> {
    #[cfg(target_os = "linux")]
    registry.register(Box::new(
        prometheus::process_collector::ProcessCollector::for_self(),
    ))?;
    #[cfg(not(target_os = "linux"))]
    let _ = registry;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_registry_renders_with_its_help_and_type() {
        let r = Registry::new();
        let c = prometheus::IntCounter::new("mqlb_test_total", "A test counter.").expect("counter");
        r.register(Box::new(c.clone())).expect("register");
        c.inc_by(3);
        let text = render(&r).expect("render");
        assert!(
            text.contains("# HELP mqlb_test_total A test counter."),
            "{text}"
        );
        assert!(text.contains("# TYPE mqlb_test_total counter"), "{text}");
        assert!(text.contains("mqlb_test_total 3"), "{text}");
    }
}
