//! PROXY protocol headers: the codec the LB and the broker nodes share lives in
//! [`mqlb_config::proxy`]; re-exported so the LB's paths stay `crate::proxy_protocol`.

pub use mqlb_config::proxy::*;
