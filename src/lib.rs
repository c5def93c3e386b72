//! The parts of the `granary` CLI that other tools reuse: the all-in-one local cluster
//! (`granary local`) and the synthetic datasets of its demo.

pub mod dataset;
pub mod local;
