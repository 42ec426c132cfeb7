pub mod alerts;
pub mod bridge;
pub mod console;
/// mqlb patch (across the cluster, issue 12).
mod durable;
pub mod local;
pub mod meters;
pub mod network;
pub mod remote;
pub mod timer;
