//! One module per subcommand.

pub mod bench;
pub mod convert;
pub mod forward;
pub mod info;
