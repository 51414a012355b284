//! The receive pipeline: a parsed batch through the userscript into the target.
