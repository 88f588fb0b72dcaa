//! One module per subcommand.

pub mod bench;
pub mod convert;
pub mod forward;
pub mod info;
pub mod trace;
pub mod train;
pub mod validate;
