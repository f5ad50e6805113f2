//! The kata-agent API, generated at build time from `protos/agent.proto` by ttrpc-codegen (no
//! system `protoc` needed): [`agent`] holds the messages, [`agent_ttrpc`] the async client and
//! server stubs of `grpc.AgentService` and `grpc.Health`.
#![allow(missing_docs, clippy::all, missing_debug_implementations)]

/// The generated code, with the lints it does not follow allowed in one place.
#[allow(
    unused_attributes,
    dead_code,
    unused_imports,
    unused_results,
    non_camel_case_types,
    non_snake_case,
    non_upper_case_globals,
    trivial_casts,
    unused_mut
)]
mod generated {
    pub mod agent {
        include!(concat!(env!("OUT_DIR"), "/agent.rs"));
    }
    pub mod agent_ttrpc {
        include!(concat!(env!("OUT_DIR"), "/agent_ttrpc.rs"));
    }
}

pub use generated::{agent, agent_ttrpc};

pub mod console;

/// Virtio-serial port name of the agent channel.
pub const SERIAL_PORT_NAME: &str = "agent.channel.0";
/// vsock port the agent listens on (Kata's).
pub const VSOCK_PORT: u32 = 1024;
