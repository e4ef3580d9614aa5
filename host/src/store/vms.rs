//! VMs and their snapshots' metadata, as the registry persists them.
//!
//! A [`VmRecord`] is a [`VmDefinition`] flattened into columns, plus what the host
//! learned about the VM: its last hypervisor state and its guest's presence, each
//! stored as the name the engine gives it. Guests that appear by saying HELLO
//! without a hypervisor VM are VMs too, with the backend `unmanaged` and their guest
//! id as name ([`VmRecord::unmanaged`]). A VM is keyed by name; its guest id, when
//! set, is unique too, so a guest maps to one VM. Replacing a VM ([`Store::put_vm`])
//! updates it in place and keeps its snapshots; removing it drops its snapshots but
//! not its commands, whose history stays. Snapshots themselves live in the
//! hypervisor: this table only remembers what it reported, for listing.

use std::path::PathBuf;

use chrono::{DateTime, Utc};
use rusqlite::ffi::{SQLITE_CONSTRAINT_FOREIGNKEY, SQLITE_CONSTRAINT_UNIQUE};
use rusqlite::{named_params, OptionalExtension};

use super::{
    int, is_constraint, millis, opt_path_value, path_value, Durability, Failure, RowReader, Store,
    StoreError,
};
use crate::hypervisor::{unmanaged, SnapshotInfo, VmDefinition, VmSpec, VmState};

/// What a new record says of its guest's presence before anything is heard.
const PRESENCE_UNKNOWN: &str = "unknown";

/// A VM as stored.
#[derive(Clone, Debug, PartialEq)]
pub struct VmRecord {
    /// The key: unique among VMs.
    pub name: String,
    /// The guest id (the MAC address, upper-case, for VMs this host runs); unique
    /// when set.
    pub id: Option<String>,
    /// The backend that owns the VM (`qemu`, `unmanaged`, ...).
    pub backend: String,
    pub image: Option<PathBuf>,
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    pub kernel_args: Option<String>,
    pub memory_mib: u32,
    pub cpus: u32,
    /// The NIC's MAC address, as the backend assigned it.
    pub mac: Option<String>,
    /// The directory of the VM's own files.
    pub dir: Option<PathBuf>,
    pub created_at: DateTime<Utc>,
    /// The last [`VmState`] name the host saw; informational, not authoritative.
    pub last_state: String,
    /// The guest's presence, as the engine names it (`unknown`, `alive`, ...).
    pub presence: String,
    /// When the presence became what it is.
    pub presence_since: DateTime<Utc>,
}

impl VmRecord {
    /// The record of a VM a backend just created: its guest id is its MAC address,
    /// its state `PoweredOff`, its presence `unknown`.
    pub fn from_definition(definition: &VmDefinition, created_at: DateTime<Utc>) -> VmRecord {
        let spec = &definition.spec;
        VmRecord {
            name: spec.name.clone(),
            id: Some(definition.mac.clone()),
            backend: definition.backend.clone(),
            image: spec.image.clone(),
            kernel: spec.kernel.clone(),
            initrd: spec.initrd.clone(),
            kernel_args: spec.kernel_args.clone(),
            memory_mib: spec.memory_mib,
            cpus: spec.cpus,
            mac: Some(definition.mac.clone()),
            dir: Some(definition.dir.clone()),
            created_at,
            last_state: VmState::PoweredOff.as_str().to_owned(),
            presence: PRESENCE_UNKNOWN.to_owned(),
            presence_since: created_at,
        }
    }

    /// The record of an unmanaged guest first heard at `at`: named after its id,
    /// state `Unknown` (only presence tells whether it runs), presence `unknown`.
    pub fn unmanaged(id: &str, at: DateTime<Utc>) -> VmRecord {
        let spec = VmSpec::new(id);
        VmRecord {
            name: id.to_owned(),
            id: Some(id.to_owned()),
            backend: unmanaged::NAME.to_owned(),
            image: None,
            kernel: None,
            initrd: None,
            kernel_args: None,
            memory_mib: spec.memory_mib,
            cpus: spec.cpus,
            mac: None,
            dir: None,
            created_at: at,
            last_state: VmState::Unknown.as_str().to_owned(),
            presence: PRESENCE_UNKNOWN.to_owned(),
            presence_since: at,
        }
    }

    /// The definition to hand to the backend. A record without a MAC address (an
    /// unmanaged guest) uses its guest id, then its name; one without a directory
    /// gets an empty path.
    pub fn definition(&self) -> VmDefinition {
        let mac = self
            .mac
            .clone()
            .or_else(|| self.id.clone())
            .unwrap_or_else(|| self.name.clone());
        VmDefinition {
            spec: VmSpec {
                name: self.name.clone(),
                image: self.image.clone(),
                kernel: self.kernel.clone(),
                initrd: self.initrd.clone(),
                kernel_args: self.kernel_args.clone(),
                memory_mib: self.memory_mib,
                cpus: self.cpus,
                mac: self.mac.clone(),
            },
            backend: self.backend.clone(),
            mac,
            dir: self.dir.clone().unwrap_or_default(),
        }
    }

    fn from_row(row: &rusqlite::Row<'_>) -> Result<VmRecord, StoreError> {
        let r = RowReader::new(row, "vms", "name")?;
        Ok(VmRecord {
            name: r.key.clone(),
            id: r.get("id")?,
            backend: r.get("backend")?,
            image: r.opt_path("image")?,
            kernel: r.opt_path("kernel")?,
            initrd: r.opt_path("initrd")?,
            kernel_args: r.get("kernel_args")?,
            memory_mib: r.u32("memory_mib")?,
            cpus: r.u32("cpus")?,
            mac: r.get("mac")?,
            dir: r.opt_path("dir")?,
            created_at: r.time("created_at")?,
            last_state: r.get("last_state")?,
            presence: r.get("presence")?,
            presence_since: r.time("presence_since")?,
        })
    }
}

const VM_COLUMNS: &str = "name, id, backend, image, kernel, initrd, kernel_args, memory_mib, \
     cpus, mac, dir, created_at, last_state, presence, presence_since";

impl Store {
    /// Inserts a VM, or replaces every field of the VM of that name (keeping its
    /// snapshots). Fails with [`StoreError::GuestIdTaken`] if another VM has its id.
    pub fn put_vm(&self, vm: &VmRecord) -> Result<(), StoreError> {
        self.write("store a VM", Durability::PowerSafe, |tx| {
            let mut stmt = tx.prepare_cached(
                "INSERT INTO vms (name, id, backend, image, kernel, initrd, kernel_args,
                     memory_mib, cpus, mac, dir, created_at, last_state, presence, presence_since)
                 VALUES (:name, :id, :backend, :image, :kernel, :initrd, :kernel_args,
                     :memory_mib, :cpus, :mac, :dir, :created_at, :last_state, :presence,
                     :presence_since)
                 ON CONFLICT (name) DO UPDATE SET
                     id = excluded.id, backend = excluded.backend, image = excluded.image,
                     kernel = excluded.kernel, initrd = excluded.initrd,
                     kernel_args = excluded.kernel_args, memory_mib = excluded.memory_mib,
                     cpus = excluded.cpus, mac = excluded.mac, dir = excluded.dir,
                     created_at = excluded.created_at, last_state = excluded.last_state,
                     presence = excluded.presence, presence_since = excluded.presence_since",
            )?;
            let inserted = stmt.execute(named_params! {
                ":name": vm.name,
                ":id": vm.id,
                ":backend": vm.backend,
                ":image": opt_path_value(vm.image.as_deref()),
                ":kernel": opt_path_value(vm.kernel.as_deref()),
                ":initrd": opt_path_value(vm.initrd.as_deref()),
                ":kernel_args": vm.kernel_args,
                ":memory_mib": vm.memory_mib,
                ":cpus": vm.cpus,
                ":mac": vm.mac,
                ":dir": vm.dir.as_deref().map(path_value),
                ":created_at": millis(vm.created_at),
                ":last_state": vm.last_state,
                ":presence": vm.presence,
                ":presence_since": millis(vm.presence_since),
            });
            match inserted {
                Ok(_) => Ok(()),
                Err(e) => {
                    let e = Failure::from(e);
                    match (&vm.id, is_constraint(&e, SQLITE_CONSTRAINT_UNIQUE)) {
                        (Some(id), true) => {
                            let holder: Option<String> = tx
                                .query_row("SELECT name FROM vms WHERE id = ?1", [id], |r| r.get(0))
                                .optional()?;
                            Err(StoreError::GuestIdTaken {
                                id: id.clone(),
                                vm: holder.unwrap_or_default(),
                            }
                            .into())
                        }
                        _ => Err(e),
                    }
                }
            }
        })
    }

    /// The VM of that name.
    pub fn vm(&self, name: &str) -> Result<Option<VmRecord>, StoreError> {
        self.read("read a VM", |conn| {
            let mut stmt =
                conn.prepare_cached(&format!("SELECT {VM_COLUMNS} FROM vms WHERE name = ?1"))?;
            let mut rows = stmt.query([name])?;
            match rows.next()? {
                Some(row) => Ok(Some(VmRecord::from_row(row)?)),
                None => Ok(None),
            }
        })
    }

    /// The VM whose guest id is `id`.
    pub fn vm_by_id(&self, id: &str) -> Result<Option<VmRecord>, StoreError> {
        self.read("find a VM by guest id", |conn| {
            let mut stmt =
                conn.prepare_cached(&format!("SELECT {VM_COLUMNS} FROM vms WHERE id = ?1"))?;
            let mut rows = stmt.query([id])?;
            match rows.next()? {
                Some(row) => Ok(Some(VmRecord::from_row(row)?)),
                None => Ok(None),
            }
        })
    }

    /// Every VM, by name.
    pub fn vms(&self) -> Result<Vec<VmRecord>, StoreError> {
        self.read("list VMs", |conn| {
            let mut stmt =
                conn.prepare_cached(&format!("SELECT {VM_COLUMNS} FROM vms ORDER BY name"))?;
            let mut rows = stmt.query([])?;
            let mut vms = Vec::new();
            while let Some(row) = rows.next()? {
                vms.push(VmRecord::from_row(row)?);
            }
            Ok(vms)
        })
    }

    /// Forgets a VM and its snapshots' metadata; its commands stay. False if there
    /// was no such VM.
    pub fn remove_vm(&self, name: &str) -> Result<bool, StoreError> {
        self.write("remove a VM", Durability::PowerSafe, |tx| {
            Ok(tx
                .prepare_cached("DELETE FROM vms WHERE name = ?1")?
                .execute([name])?
                > 0)
        })
    }

    /// Records the VM's last hypervisor state (a [`VmState`] name) and its guest's
    /// presence, which has held since `presence_since`.
    pub fn set_vm_state(
        &self,
        name: &str,
        state: &str,
        presence: &str,
        presence_since: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        self.write("store a VM's state", Durability::CrashSafe, |tx| {
            let changed = tx
                .prepare_cached(
                    "UPDATE vms SET last_state = ?2, presence = ?3, presence_since = ?4
                     WHERE name = ?1",
                )?
                .execute((name, state, presence, millis(presence_since)))?;
            if changed == 0 {
                return Err(StoreError::NoSuchVm {
                    name: name.to_owned(),
                }
                .into());
            }
            Ok(())
        })
    }

    /// Records a snapshot of `vm`, replacing one of the same name.
    pub fn put_snapshot(&self, vm: &str, snapshot: &SnapshotInfo) -> Result<(), StoreError> {
        self.write("store a snapshot", Durability::PowerSafe, |tx| {
            let inserted = tx
                .prepare_cached(
                    "INSERT INTO snapshots (vm, name, description, created_at, vm_state_bytes)
                     VALUES (?1, ?2, ?3, ?4, ?5)
                     ON CONFLICT (vm, name) DO UPDATE SET description = excluded.description,
                         created_at = excluded.created_at, vm_state_bytes = excluded.vm_state_bytes",
                )?
                .execute((
                    vm,
                    &snapshot.name,
                    &snapshot.description,
                    snapshot.created_at,
                    int(snapshot.vm_state_bytes, "the snapshot's state size")?,
                ));
            match inserted.map_err(Failure::from) {
                Ok(_) => Ok(()),
                Err(e) if is_constraint(&e, SQLITE_CONSTRAINT_FOREIGNKEY) => {
                    Err(StoreError::NoSuchVm { name: vm.to_owned() }.into())
                }
                Err(e) => Err(e),
            }
        })
    }

    /// Forgets a snapshot of `vm`. False if there was no such snapshot.
    pub fn remove_snapshot(&self, vm: &str, name: &str) -> Result<bool, StoreError> {
        self.write("remove a snapshot", Durability::PowerSafe, |tx| {
            let removed = tx
                .prepare_cached("DELETE FROM snapshots WHERE vm = ?1 AND name = ?2")?
                .execute([vm, name])?;
            Ok(removed > 0)
        })
    }

    /// The snapshots of `vm`, oldest first; empty for an unknown VM.
    pub fn snapshots(&self, vm: &str) -> Result<Vec<SnapshotInfo>, StoreError> {
        self.read("list snapshots", |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT vm || '/' || name AS key, name, description, created_at, vm_state_bytes
                 FROM snapshots WHERE vm = ?1 ORDER BY created_at, rowid",
            )?;
            let mut rows = stmt.query([vm])?;
            let mut snapshots = Vec::new();
            while let Some(row) = rows.next()? {
                let r = RowReader::new(row, "snapshots", "key")?;
                snapshots.push(SnapshotInfo {
                    name: r.get("name")?,
                    description: r.get("description")?,
                    created_at: r.get("created_at")?,
                    vm_state_bytes: r.u64("vm_state_bytes")?,
                });
            }
            Ok(snapshots)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::{at, command, temp_store};
    use std::path::Path;

    fn qemu_vm(name: &str, mac: &str) -> VmRecord {
        let mut spec = VmSpec::new(name);
        spec.image = Some(PathBuf::from("/images/debian.qcow2"));
        spec.kernel = Some(PathBuf::from("/boot/vmlinuz"));
        spec.initrd = Some(PathBuf::from("/boot/initrd.img"));
        spec.kernel_args = Some("console=ttyS0 quiet".into());
        spec.memory_mib = 1024;
        spec.cpus = 2;
        spec.mac = Some(mac.into());
        let definition = VmDefinition {
            spec,
            backend: "qemu".into(),
            mac: mac.into(),
            dir: PathBuf::from(format!("/var/lib/vmc/vms/{name}")),
        };
        VmRecord::from_definition(&definition, at(0))
    }

    fn snapshot(name: &str, created_at: i64) -> SnapshotInfo {
        SnapshotInfo {
            name: name.into(),
            description: format!("snapshot {name}"),
            created_at,
            vm_state_bytes: 123_456_789,
        }
    }

    #[test]
    fn a_vm_round_trips_and_gives_back_its_definition() {
        let (_dir, store) = temp_store();
        let vm = qemu_vm("web", "52:54:00:AA:BB:01");
        store.put_vm(&vm).unwrap();
        assert_eq!(store.vm("web").unwrap(), Some(vm.clone()));
        assert_eq!(
            store.vm_by_id("52:54:00:AA:BB:01").unwrap(),
            Some(vm.clone())
        );
        assert_eq!(store.vm("nope").unwrap(), None);
        assert_eq!(store.vm_by_id("52:54:00:AA:BB:99").unwrap(), None);

        let definition = store.vm("web").unwrap().unwrap().definition();
        assert_eq!(
            definition.spec.kernel_args.as_deref(),
            Some("console=ttyS0 quiet")
        );
        assert_eq!(definition.spec.memory_mib, 1024);
        assert_eq!(definition.mac, "52:54:00:AA:BB:01");
        assert_eq!(definition.dir, Path::new("/var/lib/vmc/vms/web"));
        assert_eq!(VmRecord::from_definition(&definition, at(0)), vm);
    }

    #[test]
    fn unmanaged_guests_are_vms_named_after_their_id() {
        let (_dir, store) = temp_store();
        store
            .put_vm(&VmRecord::unmanaged("build-box-7", at(5)))
            .unwrap();
        let vm = store.vm_by_id("build-box-7").unwrap().unwrap();
        assert_eq!(
            (vm.name.as_str(), vm.backend.as_str()),
            ("build-box-7", "unmanaged")
        );
        assert_eq!(vm.last_state, "Unknown");
        assert_eq!(vm.definition().mac, "build-box-7");
    }

    #[test]
    fn put_vm_replaces_by_name_and_keeps_snapshots() {
        let (_dir, store) = temp_store();
        store.put_vm(&qemu_vm("web", "52:54:00:AA:BB:01")).unwrap();
        store.put_snapshot("web", &snapshot("s1", 10)).unwrap();
        let mut bigger = qemu_vm("web", "52:54:00:AA:BB:01");
        bigger.memory_mib = 4096;
        store.put_vm(&bigger).unwrap();
        assert_eq!(store.vms().unwrap(), vec![bigger]);
        assert_eq!(store.snapshots("web").unwrap().len(), 1);
    }

    #[test]
    fn two_vms_cannot_share_a_guest_id() {
        let (_dir, store) = temp_store();
        store.put_vm(&qemu_vm("web", "52:54:00:AA:BB:01")).unwrap();
        let err = store
            .put_vm(&qemu_vm("db", "52:54:00:AA:BB:01"))
            .unwrap_err();
        assert!(
            matches!(&err, StoreError::GuestIdTaken { id, vm } if id == "52:54:00:AA:BB:01" && vm == "web"),
            "{err:?}"
        );
        assert_eq!(store.vms().unwrap().len(), 1);
        // VMs without an id do not collide.
        let mut a = VmRecord::unmanaged("a", at(0));
        a.id = None;
        let mut b = VmRecord::unmanaged("b", at(0));
        b.id = None;
        store.put_vm(&a).unwrap();
        store.put_vm(&b).unwrap();
        assert_eq!(store.vms().unwrap().len(), 3);
    }

    #[test]
    fn vms_are_listed_by_name_and_keep_odd_paths_exactly() {
        use std::ffi::OsStr;
        use std::os::unix::ffi::OsStrExt;
        let (_dir, store) = temp_store();
        let mut odd = qemu_vm("b-odd", "52:54:00:AA:BB:02");
        odd.image = Some(PathBuf::from(OsStr::from_bytes(b"/images/caf\xe9.qcow2")));
        store.put_vm(&odd).unwrap();
        store
            .put_vm(&qemu_vm("a-web", "52:54:00:AA:BB:01"))
            .unwrap();
        let names: Vec<String> = store.vms().unwrap().into_iter().map(|v| v.name).collect();
        assert_eq!(names, ["a-web", "b-odd"]);
        assert_eq!(store.vm("b-odd").unwrap().unwrap().image, odd.image);
    }

    #[test]
    fn set_vm_state_records_state_and_presence() {
        let (_dir, store) = temp_store();
        store.put_vm(&qemu_vm("web", "52:54:00:AA:BB:01")).unwrap();
        store
            .set_vm_state("web", "Running", "alive", at(30))
            .unwrap();
        let vm = store.vm("web").unwrap().unwrap();
        assert_eq!(
            (
                vm.last_state.as_str(),
                vm.presence.as_str(),
                vm.presence_since
            ),
            ("Running", "alive", at(30))
        );
        let err = store
            .set_vm_state("ghost", "Running", "alive", at(30))
            .unwrap_err();
        assert!(matches!(err, StoreError::NoSuchVm { .. }), "{err:?}");
    }

    #[test]
    fn snapshots_round_trip_and_are_removed_one_by_one() {
        let (_dir, store) = temp_store();
        store.put_vm(&qemu_vm("web", "52:54:00:AA:BB:01")).unwrap();
        store.put_snapshot("web", &snapshot("later", 20)).unwrap();
        store.put_snapshot("web", &snapshot("first", 10)).unwrap();
        assert_eq!(
            store.snapshots("web").unwrap(),
            vec![snapshot("first", 10), snapshot("later", 20)]
        );
        assert!(store.remove_snapshot("web", "first").unwrap());
        assert!(!store.remove_snapshot("web", "first").unwrap());
        assert_eq!(store.snapshots("web").unwrap(), vec![snapshot("later", 20)]);
        assert_eq!(store.snapshots("nope").unwrap(), vec![]);
        let err = store.put_snapshot("nope", &snapshot("x", 1)).unwrap_err();
        assert!(matches!(err, StoreError::NoSuchVm { .. }), "{err:?}");
    }

    #[test]
    fn removing_a_vm_drops_its_snapshots_but_keeps_its_commands() {
        let (_dir, store) = temp_store();
        store.put_vm(&qemu_vm("web", "52:54:00:AA:BB:01")).unwrap();
        store.put_snapshot("web", &snapshot("s1", 10)).unwrap();
        store.insert_command(&command("c-1", "web", at(1))).unwrap();

        assert!(store.remove_vm("web").unwrap());
        assert!(!store.remove_vm("web").unwrap());
        assert_eq!(store.vm("web").unwrap(), None);
        let left: i64 = store
            .lock()
            .query_row("SELECT count(*) FROM snapshots", [], |r| r.get(0))
            .unwrap();
        assert_eq!(left, 0);
        let kept = store
            .command("c-1")
            .unwrap()
            .expect("the command outlives its VM");
        assert_eq!(kept.vm.as_deref(), Some("web"));
    }
}
