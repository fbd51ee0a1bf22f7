"""One valid example of every message type, with fresh ids each call."""

from __future__ import annotations

import uuid
from collections.abc import Callable

from schemas import api, common, instance, progress, region, sled, snapshot
from schemas.base import Envelope, command_id, utcnow


def region_spec() -> region.RegionSpec:
    return region.RegionSpec(
        id=uuid.uuid4(), block_size=512, extent_size=64, extent_count=8, encrypted=True
    )


def a_region(state: region.RegionState = region.RegionState.CREATED) -> region.Region:
    spec = region_spec()
    return region.Region(**spec.model_dump(), port_number=19000, state=state, generation=2)


def a_snapshot(region_id: uuid.UUID | None = None) -> snapshot.Snapshot:
    return snapshot.Snapshot(
        region_id=region_id or uuid.uuid4(),
        name=str(uuid.uuid4()),
        created=utcnow(),
        state=snapshot.SnapshotState.CREATED,
        generation=1,
    )


def a_running_snapshot(of: snapshot.Snapshot) -> snapshot.RunningSnapshot:
    return snapshot.RunningSnapshot(
        id=of.region_id,
        name=of.name,
        port_number=19001,
        state=region.RegionState.CREATED,
        generation=2,
    )


def a_snapshot_ref() -> snapshot.SnapshotRef:
    return snapshot.SnapshotRef(region_id=uuid.uuid4(), name=str(uuid.uuid4()))


def region_snapshots() -> snapshot.RegionSnapshots:
    taken = a_snapshot()
    return snapshot.RegionSnapshots(
        agent_id=uuid.uuid4(),
        region_id=taken.region_id,
        region_state=region.RegionState.CREATED,
        snapshots=(taken,),
        running_snapshots=(a_running_snapshot(taken),),
    )


def a_vmm() -> instance.Vmm:
    return instance.Vmm(
        id=uuid.uuid4(),
        instance_id=uuid.uuid4(),
        sled_id=uuid.uuid4(),
        name="web-1",
        ncpus=2,
        memory_bytes=1 << 30,
        disk_ids=(uuid.uuid4(),),
        state=instance.VmmState.RUNNING,
        generation=3,
    )


def disk_view() -> api.DiskView:
    now = utcnow()
    return api.DiskView(
        id=uuid.uuid4(),
        project="demo",
        name="data-1",
        size_bytes=1 << 30,
        block_size=4096,
        state=progress.DiskState.DETACHED,
        saga_id=uuid.uuid4(),
        created_at=now,
        updated_at=now,
    )


def snapshot_view() -> api.SnapshotView:
    now = utcnow()
    return api.SnapshotView(
        id=uuid.uuid4(),
        project="demo",
        name="snap-1",
        disk_id=uuid.uuid4(),
        size_bytes=1 << 30,
        block_size=512,
        state="ready",
        saga_id=uuid.uuid4(),
        parts=tuple(
            api.SnapshotPartView(
                region_id=uuid.uuid4(),
                dataset_id=uuid.uuid4(),
                snapshot_state="created",
                running_state="created",
                snapshot_addr=f"sled-{n}:{19100 + n}",
            )
            for n in range(3)
        ),
        created_at=now,
        updated_at=now,
    )


def instance_view() -> api.InstanceView:
    now = utcnow()
    return api.InstanceView(
        id=uuid.uuid4(),
        project="demo",
        name="web-1",
        ncpus=2,
        memory_bytes=1 << 30,
        state="running",
        sled_id=uuid.uuid4(),
        disk_ids=(uuid.uuid4(),),
        created_at=now,
        updated_at=now,
    )


def saga_view() -> api.SagaView:
    now = utcnow()
    return api.SagaView(
        id=uuid.uuid4(),
        name="disk_create",
        version=1,
        state="waiting",
        lease_owner=None,
        error=None,
        created_at=now,
        updated_at=now,
        log=(api.SagaLogEntry(node="regions_ensure", event="waiting", replica="a", at=now),),
        waiting_for=(
            api.WaitView(
                wait_key=f"region:{uuid.uuid4()}:created",
                node="regions_ensure",
                since=now,
                deadline=now,
            ),
        ),
    )


SAGA = uuid.uuid4()
NEXUS = "nexus/replica-a"
CRUCIBLE = f"crucible/{uuid.uuid4()}"
SLED = f"sled/{uuid.uuid4()}"
CLI = "cli/operator"

BUILDERS: dict[str, Callable[[], Envelope]] = {
    "region.ensure.v1": lambda: region.RegionEnsure(
        id=command_id(SAGA, "ensure"), source=NEXUS, correlation_id=SAGA, payload=region_spec()
    ),
    "region.delete.v1": lambda: region.RegionDelete(
        source=NEXUS, payload=region.RegionRef(id=uuid.uuid4())
    ),
    "region.get.v1": lambda: region.RegionGet(
        source=NEXUS, payload=region.RegionRef(id=uuid.uuid4())
    ),
    "region.list.v1": lambda: region.RegionList(source=NEXUS),
    "region.info.v1": lambda: region.RegionInfo(
        source=CRUCIBLE,
        payload=region.RegionFound(
            agent_id=uuid.uuid4(), region=a_region(), region_id=uuid.uuid4()
        ),
    ),
    "region.listed.v1": lambda: region.RegionListed(
        source=CRUCIBLE,
        payload=region.RegionListing(agent_id=uuid.uuid4(), regions=(a_region(), a_region())),
    ),
    "region.state_changed.v1": lambda: region.RegionStateChanged(
        source=CRUCIBLE,
        correlation_id=SAGA,
        causation_id=uuid.uuid4(),
        payload=region.RegionChange(agent_id=uuid.uuid4(), region=a_region()),
    ),
    "region_snapshot.create.v1": lambda: snapshot.RegionSnapshotCreate(
        id=command_id(SAGA, "snapshot"), source=NEXUS, correlation_id=SAGA, payload=a_snapshot_ref()
    ),
    "region_snapshot.delete.v1": lambda: snapshot.RegionSnapshotDelete(
        source=NEXUS, payload=a_snapshot_ref()
    ),
    "region_snapshot.get.v1": lambda: snapshot.RegionSnapshotGet(
        source=NEXUS, payload=a_snapshot_ref()
    ),
    "region_snapshot.list.v1": lambda: snapshot.RegionSnapshotList(
        source=NEXUS, payload=region.RegionRef(id=uuid.uuid4())
    ),
    "region_snapshot.info.v1": lambda: snapshot.RegionSnapshotsInfo(
        source=CRUCIBLE, payload=region_snapshots()
    ),
    "region_snapshot.state_changed.v1": lambda: snapshot.RegionSnapshotStateChanged(
        source=CRUCIBLE,
        correlation_id=SAGA,
        payload=snapshot.RegionSnapshotChange(agent_id=uuid.uuid4(), snapshot=a_snapshot()),
    ),
    "running_snapshot.run.v1": lambda: snapshot.RunningSnapshotRun(
        source=NEXUS, payload=a_snapshot_ref()
    ),
    "running_snapshot.stop.v1": lambda: snapshot.RunningSnapshotStop(
        source=NEXUS, payload=a_snapshot_ref()
    ),
    "running_snapshot.state_changed.v1": lambda: snapshot.RunningSnapshotStateChanged(
        source=CRUCIBLE,
        correlation_id=SAGA,
        payload=snapshot.RunningSnapshotChange(
            agent_id=uuid.uuid4(), running_snapshot=a_running_snapshot(a_snapshot())
        ),
    ),
    "vmm.ensure.v1": lambda: instance.VmmEnsure(
        source=NEXUS,
        payload=instance.VmmSpec(
            id=uuid.uuid4(),
            instance_id=uuid.uuid4(),
            name="web-1",
            ncpus=2,
            memory_bytes=1 << 30,
        ),
    ),
    "vmm.stop.v1": lambda: instance.VmmStop(source=NEXUS, payload=instance.VmmRef(id=uuid.uuid4())),
    "vmm.reboot.v1": lambda: instance.VmmReboot(
        source=NEXUS, payload=instance.VmmRef(id=uuid.uuid4())
    ),
    "vmm.crash.v1": lambda: instance.VmmCrash(
        source=CLI, payload=instance.CrashRequest(id=uuid.uuid4())
    ),
    "vmm.get.v1": lambda: instance.VmmGet(source=NEXUS, payload=instance.VmmRef(id=uuid.uuid4())),
    "vmm.disk_snapshot.v1": lambda: instance.VmmDiskSnapshot(
        source=NEXUS,
        payload=instance.DiskSnapshotRequest(
            id=uuid.uuid4(), disk_id=uuid.uuid4(), snapshot_id=uuid.uuid4()
        ),
    ),
    "vmm.disk_flushed.v1": lambda: instance.VmmDiskFlushed(
        source=SLED,
        payload=instance.DiskFlushed(
            sled_id=uuid.uuid4(),
            vmm_id=uuid.uuid4(),
            disk_id=uuid.uuid4(),
            snapshot_id=uuid.uuid4(),
        ),
    ),
    "vmm.info.v1": lambda: instance.VmmInfo(
        source=SLED,
        payload=instance.VmmFound(sled_id=uuid.uuid4(), vmm_id=uuid.uuid4(), vmm=a_vmm()),
    ),
    "vmm.state_changed.v1": lambda: instance.VmmStateChanged(
        source=SLED, payload=instance.VmmChange(vmm=a_vmm())
    ),
    "sled.registered.v1": lambda: sled.SledRegistered(
        source=SLED,
        payload=sled.SledInfo(
            sled_id=uuid.uuid4(),
            hostname="sled-1",
            cpus=16,
            memory_bytes=64 << 30,
            queue=f"sled.{uuid.uuid4()}",
        ),
    ),
    "sled.heartbeat.v1": lambda: sled.SledHeartbeat(
        source=SLED,
        payload=sled.Heartbeat(
            sled_id=uuid.uuid4(),
            sequence=7,
            started_at=utcnow(),
            cpus_used=4,
            memory_used_bytes=8 << 30,
            instances_running=2,
        ),
    ),
    "agent.announced.v1": lambda: sled.AgentAnnounced(
        source=CRUCIBLE,
        payload=sled.CrucibleAgentInfo(
            agent_id=uuid.uuid4(),
            sled_id=uuid.uuid4(),
            queue=f"crucible.{uuid.uuid4()}",
            capacity_bytes=1 << 40,
            free_bytes=1 << 39,
            regions=3,
        ),
    ),
    "command.rejected.v1": lambda: common.CommandRejected(
        source=CRUCIBLE,
        payload=common.Rejection(
            command_id=uuid.uuid4(),
            command_type="region.ensure.v1",
            code="conflict",
            message="region exists with other parameters",
        ),
    ),
    "disk.updated.v1": lambda: progress.DiskUpdated(
        source=NEXUS,
        payload=progress.DiskProgress(
            disk_id=uuid.uuid4(),
            project="demo",
            name="data-1",
            state=progress.DiskState.CREATING,
            generation=1,
        ),
    ),
    "nexus.instance.updated.v1": lambda: progress.InstanceUpdated(
        source=NEXUS,
        payload=progress.InstanceProgress(
            instance_id=uuid.uuid4(),
            project="demo",
            name="web-1",
            state="running",
            generation=4,
            sled_id=uuid.uuid4(),
        ),
    ),
    "saga.progressed.v1": lambda: progress.SagaProgressed(
        source=NEXUS,
        payload=progress.SagaProgress(
            saga_id=uuid.uuid4(),
            saga_name="disk_create",
            node="regions_ensure",
            step=progress.SagaStep.WAITING,
            replica="replica-a",
        ),
    ),
    "api.disk.create.v1": lambda: api.DiskCreate(
        source=CLI,
        payload=api.DiskCreateRequest(project="demo", name="data-1", size_bytes=1 << 30),
    ),
    "api.disk.get.v1": lambda: api.DiskGet(
        source=CLI, payload=api.ResourceRef(project="demo", resource="data-1")
    ),
    "api.disk.delete.v1": lambda: api.DiskDelete(
        source=CLI, payload=api.ResourceRef(project="demo", resource=uuid.uuid4())
    ),
    "api.disk.list.v1": lambda: api.DiskList(source=CLI, payload=api.ProjectFilter(project="demo")),
    "api.snapshot.create.v1": lambda: api.SnapshotCreate(
        source=CLI,
        payload=api.SnapshotCreateRequest(project="demo", name="snap-1", disk="data-1"),
    ),
    "api.snapshot.get.v1": lambda: api.SnapshotGet(
        source=CLI, payload=api.ResourceRef(project="demo", resource="snap-1")
    ),
    "api.snapshot.delete.v1": lambda: api.SnapshotDelete(
        source=CLI, payload=api.ResourceRef(project="demo", resource=uuid.uuid4())
    ),
    "api.snapshot.list.v1": lambda: api.SnapshotList(source=CLI),
    "api.snapshot.v1": lambda: api.SnapshotReply(source=NEXUS, payload=snapshot_view()),
    "api.snapshots.v1": lambda: api.SnapshotListReply(source=NEXUS, payload=(snapshot_view(),)),
    "api.instance.create.v1": lambda: api.InstanceCreate(
        source=CLI,
        payload=api.InstanceCreateRequest(
            project="demo", name="web-1", ncpus=2, memory_bytes=1 << 30, disks=("data-1",)
        ),
    ),
    "api.instance.act.v1": lambda: api.InstanceAct(
        source=CLI,
        payload=api.InstanceActionRequest(
            project="demo", resource="web-1", action=api.InstanceAction.REBOOT
        ),
    ),
    "api.instance.list.v1": lambda: api.InstanceList(source=CLI),
    "api.saga.list.v1": lambda: api.SagaList(source=CLI, payload=api.SagaFilter(state="stuck")),
    "api.saga.get.v1": lambda: api.SagaGet(source=CLI, payload=api.SagaRef(saga_id=uuid.uuid4())),
    "api.doctor.v1": lambda: api.Doctor(source=CLI),
    "api.disk.v1": lambda: api.DiskReply(source=NEXUS, payload=disk_view()),
    "api.disks.v1": lambda: api.DiskListReply(source=NEXUS, payload=(disk_view(), disk_view())),
    "api.instance.v1": lambda: api.InstanceReply(source=NEXUS, payload=instance_view()),
    "api.instances.v1": lambda: api.InstanceListReply(source=NEXUS, payload=(instance_view(),)),
    "api.saga.v1": lambda: api.SagaReply(source=NEXUS, payload=saga_view()),
    "api.sagas.v1": lambda: api.SagaListReply(source=NEXUS, payload=(saga_view(),)),
    "api.accepted.v1": lambda: api.AcceptedReply(
        source=NEXUS, payload=api.Accepted(saga_id=uuid.uuid4(), resource_id=uuid.uuid4())
    ),
    "api.doctor_report.v1": lambda: api.DoctorReply(
        source=NEXUS,
        payload=api.DoctorReport(
            checked_agents=5,
            findings=(api.DoctorFinding(kind="orphan_region", object_id="r1", detail="no disk"),),
        ),
    ),
    "api.events.unclaimed.v1": lambda: api.UnclaimedEventsList(
        source=CLI, payload=api.UnclaimedFilter(groups=10, examples=2)
    ),
    "api.events.unclaimed_summary.v1": lambda: api.UnclaimedEventsReply(
        source=NEXUS, payload=unclaimed_summary()
    ),
    "api.sled.list.v1": lambda: api.SledList(source=CLI),
    "api.sled.expunge.v1": lambda: api.SledExpunge(
        source=CLI, payload=api.SledRef(sled_id=uuid.uuid4())
    ),
    "api.sleds.v1": lambda: api.SledListReply(source=NEXUS, payload=(sled_view(),)),
    "api.sled.expunged.v1": lambda: api.SledExpungeReply(
        source=NEXUS,
        payload=api.SledExpunged(
            sled=sled_view(), changed=True, datasets_expunged=1, vmms_failed=2
        ),
    ),
    "api.region_replacement.list.v1": lambda: api.RegionReplacementList(
        source=CLI, payload=api.ReplacementFilter(state="driving")
    ),
    "api.region_replacement.get.v1": lambda: api.RegionReplacementGet(
        source=CLI, payload=api.ReplacementRef(id=uuid.uuid4())
    ),
    "api.region_replacement.v1": lambda: api.RegionReplacementReply(
        source=NEXUS, payload=replacement_view()
    ),
    "api.region_replacements.v1": lambda: api.RegionReplacementListReply(
        source=NEXUS, payload=(replacement_view(),)
    ),
    "volume.repair.v1": lambda: instance.VolumeRepair(source=NEXUS, payload=a_repair_spec()),
    "volume.repair_get.v1": lambda: instance.VolumeRepairGet(
        source=NEXUS, payload=instance.RepairRef(id=uuid.uuid4())
    ),
    "volume.repair_info.v1": lambda: instance.RepairInfo(
        source=SLED,
        payload=instance.RepairFound(
            sled_id=uuid.uuid4(), repair_id=uuid.uuid4(), repair=a_repair()
        ),
    ),
    "volume.repair_changed.v1": lambda: instance.RepairChanged(
        source=SLED, payload=instance.RepairChange(repair=a_repair())
    ),
    "api.error.v1": lambda: api.ApiError(
        source=NEXUS,
        payload=api.ApiErrorBody(code=api.ErrorCode.NOT_FOUND, message="no disk named x"),
    ),
}


def a_repair_spec() -> instance.RepairSpec:
    return instance.RepairSpec(
        id=uuid.uuid4(),
        vmm_id=uuid.uuid4(),
        disk_id=uuid.uuid4(),
        old_region_id=uuid.uuid4(),
        new_region_id=uuid.uuid4(),
        new_dataset_id=uuid.uuid4(),
    )


def a_repair() -> instance.Repair:
    spec = a_repair_spec()
    return instance.Repair(
        id=spec.id,
        sled_id=uuid.uuid4(),
        vmm_id=spec.vmm_id,
        disk_id=spec.disk_id,
        old_region_id=spec.old_region_id,
        new_region_id=spec.new_region_id,
        state=instance.RepairState.PROGRESS,
        progress=50,
        generation=3,
    )


def replacement_view() -> api.ReplacementView:
    now = utcnow()
    return api.ReplacementView(
        id=uuid.uuid4(),
        state="driving",
        since=now,
        waiting_for="sled s: live repair of disk d (50%)",
        request_time=now,
        disk_id=uuid.uuid4(),
        old_region_id=uuid.uuid4(),
        old_dataset_id=uuid.uuid4(),
        new_region_id=uuid.uuid4(),
        new_dataset_id=uuid.uuid4(),
        operating_saga_id=uuid.uuid4(),
        attempts=1,
        repair_mode="live",
        repair_progress=50,
        history=(api.ReplacementPhase(state="requested", at=now),),
    )


def sled_view() -> api.SledView:
    now = utcnow()
    dataset = api.DatasetView(
        id=uuid.uuid4(),
        state="expunged",
        capacity_bytes=1 << 36,
        free_bytes=1 << 35,
        last_seen_at=now,
    )
    return api.SledView(
        id=uuid.uuid4(),
        hostname="sled-1",
        state="expunged",
        cpus=32,
        memory_bytes=1 << 37,
        last_heartbeat_at=now,
        datasets=(dataset,),
    )


def unclaimed_summary() -> api.UnclaimedSummary:
    now = utcnow()
    region_id = uuid.uuid4()
    example = api.UnclaimedExample(
        message_id=uuid.uuid4(),
        wait_key=f"region:{region_id}:created",
        summary=f"region {region_id} created (generation 2)",
        arrived_at=now,
        moved_at=now,
    )
    group = api.UnclaimedGroup(
        type="region.created",
        source=f"crucible/{uuid.uuid4()}",
        count=1,
        oldest_at=now,
        newest_at=now,
        examples=(example,),
    )
    return api.UnclaimedSummary(total=1, scanned=1, group_count=1, groups=(group,))


def example(message_type: str) -> Envelope:
    return BUILDERS[message_type]()
