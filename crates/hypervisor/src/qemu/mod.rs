//! The QEMU driver: [`argv`] (pure command line), [`qmp`] (async monitor client), [`block`]
//! (block hot-plug arguments) and [`vm`] (launch, supervise, hot-plug, stop).

pub mod argv;
pub mod block;
pub mod qmp;
pub mod vm;
