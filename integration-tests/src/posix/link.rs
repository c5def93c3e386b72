//! link(2): hard links (a documented exception on Granary).

use super::{As, Case};

pub fn cases() -> Vec<Case> {
    vec![Case {
        name: "link/hard_link",
        body_as: As::Root,
        setup: |p| p.make_file("f", b"x"),
        body: |p| {
            p.link("f", "g");
            p.stat("f");
        },
    }]
}
