//! The archives kiln writes are what containerd imports: Debian's containerd
//! runs as root with its own root/state/socket in a temp dir, `ctr images
//! import` loads each archive, and the imported digest must be the pinned one.

mod oci_support;

use kiln::image::oci::{pull, write_archive, ImageRef, PullOptions};
use oci_support::containerd::{is_root, Containerd};
use oci_support::*;

#[test]
fn containerd_imports_each_archive_under_the_pinned_digest() {
    let test = "containerd import";
    if !have_tools(test, REGISTRY_TOOLS)
        || !have_tools(
            test,
            &[
                ("containerd", "containerd"),
                ("ctr", "containerd"),
                ("zstd", "zstd"),
            ],
        )
    {
        return;
    }
    if !is_root() {
        eprintln!("SKIPPED {test}: containerd needs root");
        return;
    }
    let reg = Registry::start();
    let amd = reg.push_image("kiln/multi", "amd64", &[("bin/tool", b"x86 tool")], None);
    let arm = reg.push_image(
        "kiln/multi",
        "arm64",
        &[("bin/tool", b"arm tool")],
        Some("arm64"),
    );
    let index = reg.push_index("kiln/multi", "v2", &[(&arm, "arm64"), (&amd, "amd64")]);
    let single = reg.push_image("kiln/single", "v1", &[("etc/motd", b"baked\n")], None);
    // Docker media types (manifest list + v2 manifests), as many upstream images use.
    let d_amd = reg.push_image_as("kiln/dock", "amd64", &[("a", b"x86")], None, Some("v2s2"));
    let d_arm = reg.push_image_as(
        "kiln/dock",
        "arm64",
        &[("a", b"arm")],
        Some("arm64"),
        Some("v2s2"),
    );
    let list = reg.push_docker_list("kiln/dock", "v1", &[(&d_arm, "arm64"), (&d_amd, "amd64")]);

    let t = tempfile::tempdir().unwrap();
    let multi = ImageRef::parse(&format!("{}/kiln/multi:v2@{index}", reg.host())).unwrap();
    let one = ImageRef::parse(&format!("{}/kiln/single:v1@{single}", reg.host())).unwrap();
    let dock = ImageRef::parse(&format!("{}/kiln/dock:v1@{list}", reg.host())).unwrap();
    let pulled = pull(
        &[multi.clone(), one.clone(), dock.clone()],
        &PullOptions::new(t.path().join("cache")),
    )
    .unwrap();

    let images_dir = t.path().join("agent/images");
    let tar = images_dir.join(pulled[0].archive_file_name(false));
    let zst = images_dir.join(pulled[1].archive_file_name(true));
    write_archive(&pulled[0], &tar).unwrap();
    write_archive(&pulled[1], &zst).unwrap();
    let dock_tar = images_dir.join(pulled[2].archive_file_name(false));
    write_archive(&pulled[2], &dock_tar).unwrap();
    // K3s decompresses .tar.zst itself before handing the stream to containerd;
    // Debian's ctr 1.6 does not, so this test does that step with zstd.
    let unpacked = t.path().join("single.tar");
    run(
        "zstd",
        &[
            "-q",
            "-d",
            &zst.to_string_lossy(),
            "-o",
            &unpacked.to_string_lossy(),
        ],
    );

    let ctd = Containerd::start();
    ctd.import(&tar);
    ctd.import(&unpacked);
    ctd.import(&dock_tar);
    assert_eq!(ctd.digest_of(&multi.containerd_name()), Some(index.clone()));
    assert_eq!(ctd.digest_of(&one.containerd_name()), Some(single.clone()));
    assert_eq!(ctd.digest_of(&dock.containerd_name()), Some(list.clone()));
    // Every linux/amd64 blob arrived and unpacked: containerd calls the images
    // complete and their layers unpacked.
    let check = ctd.ctr(&["images", "check"]);
    let text = String::from_utf8_lossy(&check.stdout);
    for name in [
        multi.containerd_name(),
        one.containerd_name(),
        dock.containerd_name(),
    ] {
        let line = text
            .lines()
            .find(|l| l.starts_with(&name))
            .unwrap_or_else(|| panic!("{name} not in {text}"));
        assert!(line.contains("complete"), "{line}");
        assert!(
            line.trim_end().ends_with("true"),
            "layers not unpacked: {line}"
        );
    }
}
