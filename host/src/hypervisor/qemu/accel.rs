//! Choosing QEMU's accelerator: KVM when it really works, TCG otherwise.
//!
//! `/dev/kvm` existing proves little: a nested, paravirtual KVM may accept a VM and
//! then crawl through it (every real-mode instruction emulated, a stock kernel
//! never getting past its early boot) or stop it with "emulation failure". So
//! [`detect`] tries it: QEMU boots, under `-accel kvm`, a 64 KiB firmware image of
//! our own whose reset vector runs a 16-million-iteration loop that writes memory
//! and then writes to `isa-debug-exit`, which ends QEMU with exit status 99. A
//! working KVM does that in a few milliseconds, TCG in about 0.3 s, a broken KVM
//! takes many seconds; so only exit 99 within the deadline (default 1.5 s) counts.
//! What it does not do: tune CPU models or probe anything but x86 `-M pc`.

use std::fs;
use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// What the settings ask for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AccelMode {
    /// KVM if the probe shows it works, else TCG.
    #[default]
    Auto,
    /// KVM, without probing (the operator knows it works).
    Kvm,
    /// TCG (pure emulation), always available.
    Tcg,
}

/// The accelerator a backend uses for every VM it starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accelerator {
    Kvm,
    Tcg,
}

impl Accelerator {
    /// The name QEMU's `-accel` takes.
    pub fn as_str(self) -> &'static str {
        match self {
            Accelerator::Kvm => "kvm",
            Accelerator::Tcg => "tcg",
        }
    }
}

/// The outcome of [`detect`]: the accelerator and why it was chosen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccelChoice {
    pub accelerator: Accelerator,
    pub reason: String,
}

/// The exit status of QEMU when the probe firmware ran to its end:
/// `isa-debug-exit` exits with `(value << 1) | 1`, the probe writes 0x31.
const PROBE_EXIT_STATUS: i32 = 0x63;

/// The probe firmware: 64 KiB (QEMU wants a multiple of 64 KiB), mapped just below
/// 4 GiB, so its last 16 bytes are the reset vector.
fn probe_firmware() -> Vec<u8> {
    let mut image = vec![0xF4u8; 0x10000]; // hlt everywhere else
    #[rustfmt::skip]
    let body: [u8; 21] = [
        0xBA, 0x00, 0x01,       //     mov dx, 0x100
        0xB9, 0xFF, 0xFF,       // l1: mov cx, 0xffff
        0xA2, 0x00, 0x10,       // l2: mov [0x1000], al
        0xE2, 0xFB,             //     loop l2
        0x4A,                   //     dec dx
        0x75, 0xF5,             //     jnz l1
        0xB0, 0x31,             //     mov al, 0x31
        0xE6, 0xF4,             //     out 0xf4, al   (isa-debug-exit: QEMU exits)
        0xF4,                   // l3: hlt
        0xEB, 0xFD,             //     jmp l3
    ];
    image[..body.len()].copy_from_slice(&body);
    // Reset vector, CS base 0xffff0000, IP 0xfff0: jmp near to offset 0 (wraps).
    image[0xFFF0..0xFFF3].copy_from_slice(&[0xE9, 0x0D, 0x00]);
    image
}

/// Resolves `mode` into an accelerator, probing KVM for [`AccelMode::Auto`];
/// `work_dir` receives the probe firmware. Never fails: anything wrong with KVM
/// means TCG, and the reason says what.
pub fn detect(mode: AccelMode, qemu: &Path, work_dir: &Path, deadline: Duration) -> AccelChoice {
    match mode {
        AccelMode::Tcg => tcg("TCG was asked for"),
        AccelMode::Kvm => AccelChoice {
            accelerator: Accelerator::Kvm,
            reason: "KVM was asked for (not probed)".into(),
        },
        AccelMode::Auto => match probe_kvm(qemu, work_dir, deadline) {
            Ok(elapsed) => AccelChoice {
                accelerator: Accelerator::Kvm,
                reason: format!("the KVM probe ran in {} ms", elapsed.as_millis()),
            },
            Err(why) => tcg(&format!("KVM is not usable: {why}")),
        },
    }
}

fn tcg(reason: &str) -> AccelChoice {
    AccelChoice {
        accelerator: Accelerator::Tcg,
        reason: reason.to_owned(),
    }
}

/// Boots the probe firmware under KVM; Ok(how long it took) if it ran to its end.
fn probe_kvm(qemu: &Path, work_dir: &Path, deadline: Duration) -> Result<Duration, String> {
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map_err(|e| format!("cannot open /dev/kvm ({e})"))?;
    let firmware = work_dir.join("kvm-probe.bin");
    fs::write(&firmware, probe_firmware())
        .map_err(|e| format!("cannot write {} ({e})", firmware.display()))?;
    let started = Instant::now();
    let mut child = Command::new(qemu)
        .args([
            "-nodefaults",
            "-no-user-config",
            "-machine",
            "pc",
            "-accel",
            "kvm",
        ])
        .args(["-display", "none", "-m", "16", "-bios"])
        .arg(&firmware)
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {} ({e})", qemu.display()))?;
    let outcome = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Ok((status, started.elapsed())),
            Ok(None) if started.elapsed() >= deadline => {
                break Err(format!(
                    "the probe did not finish within {} ms (KVM too slow or stuck)",
                    deadline.as_millis()
                ))
            }
            Ok(None) => thread::sleep(Duration::from_millis(10)),
            Err(e) => break Err(format!("cannot wait for the probe ({e})")),
        }
    };
    if outcome.is_err() {
        // Best effort: the probe is our child; kill and reap it either way.
        let _ = child.kill();
        let _ = child.wait();
    }
    let _ = fs::remove_file(&firmware);
    let (status, elapsed) = outcome?;
    if status.code() == Some(PROBE_EXIT_STATUS) {
        return Ok(elapsed);
    }
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        let _ = pipe.read_to_string(&mut stderr);
    }
    let stderr = stderr
        .lines()
        .filter(|l| !l.contains("warning:"))
        .collect::<Vec<_>>()
        .join("; ");
    Err(format!("the probe ended with {status}: {stderr}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probe_firmware_jumps_from_the_reset_vector_to_its_loop() {
        let image = probe_firmware();
        assert_eq!(image.len(), 64 * 1024);
        // jmp rel16 at 0xfff0: target = 0xfff3 + 0x000d = 0x10000, i.e. offset 0.
        assert_eq!(&image[0xFFF0..0xFFF3], &[0xE9, 0x0D, 0x00]);
        assert_eq!(0xFFF3u16.wrapping_add(0x000D), 0);
        assert_eq!(&image[14..18], &[0xB0, 0x31, 0xE6, 0xF4]);
        assert_eq!((0x31 << 1) | 1, PROBE_EXIT_STATUS);
    }

    #[test]
    fn forced_modes_are_not_probed() {
        let nowhere = Path::new("/nonexistent");
        let tcg = detect(AccelMode::Tcg, nowhere, nowhere, Duration::ZERO);
        assert_eq!(tcg.accelerator, Accelerator::Tcg);
        let kvm = detect(AccelMode::Kvm, nowhere, nowhere, Duration::ZERO);
        assert_eq!(kvm.accelerator, Accelerator::Kvm);
    }

    #[test]
    fn auto_falls_back_to_tcg_when_the_probe_cannot_run() {
        let dir = tempfile::tempdir().expect("tempdir");
        let choice = detect(
            AccelMode::Auto,
            Path::new("/nonexistent/qemu-system-x86_64"),
            dir.path(),
            Duration::from_secs(1),
        );
        assert_eq!(choice.accelerator, Accelerator::Tcg);
        assert!(
            choice.reason.starts_with("KVM is not usable: "),
            "{}",
            choice.reason
        );
    }
}
