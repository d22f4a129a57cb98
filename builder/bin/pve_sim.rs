//! `pve-sim`: a stand-in for the Proxmox VE API, so publishing can be tested
//! and tried without a Proxmox cluster. It is a simulator, not Proxmox.

fn main() {
    eprintln!("pve-sim is under construction");
    std::process::exit(2);
}
