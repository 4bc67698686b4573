//! Shared code of the fuzz targets in `fuzz_targets/` (see README.md).

pub mod codec;
pub mod session;
