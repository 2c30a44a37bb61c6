//! OpenNebula as the inventory: oned decides who may open which console.

pub mod vmdoc;
