//! Environments: a whole cluster as data (`model`), compared with what a
//! provider shows (`plan`), carried out step by step (`apply`) under a lock with a journal.

pub(crate) mod model;
