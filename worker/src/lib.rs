//! The data-plane worker. (Being built; see issue 6.)
