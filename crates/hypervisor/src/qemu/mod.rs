//! The QEMU driver: [`argv`] (pure command line), [`qmp`] (async monitor client) and [`vm`]
//! (launch, supervise, hot-plug, stop).

pub mod argv;
pub mod qmp;
pub mod vm;
