//! MQTT rules every mqlb broker node keeps, alone and across the cluster: one test per rule,
//! each run on one node directly, through the LB, across two meshed nodes, and on mosquitto as
//! the reference (see [`harness`]). A module per part of the protocol; each test is named
//! after its rule and cites the spec's conformance statement.

mod harness;

mod cluster;
mod connect;

mod delivery;
mod session;
