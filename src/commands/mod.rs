//! One module per subcommand.

pub mod bench;
pub mod bench_infer;
pub mod chat;
pub mod convert;
pub mod forward;
pub mod generate;
pub mod info;
pub mod port_report;
pub mod synth;
pub mod trace;
pub mod train;
pub mod validate;
