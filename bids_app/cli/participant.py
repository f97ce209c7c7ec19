"""Participant level: check inputs, run the Nipype graph, write records, reports and a summary."""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..bids import AnatInputs, atomic_write_text, collect_anatomical, load_layout, write_dataset_description
from ..config import RunConfig
from ..errors import EXIT_OK, EXIT_PARTICIPANT_FAILED, ArborSegError, DatasetError

LOGGER = logging.getLogger("arborseg")


@dataclass
class SubjectRun:
    """What happened to one subject/session in this run (becomes ``logs/<label>_record.json``)."""

    inputs: AnatInputs
    status: str = "pending"  # pending | success | failed | skipped
    error: str | None = None
    warnings: list[str] = field(default_factory=list)
    input_summary: list[dict] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    failed_nodes: list[str] = field(default_factory=list)


class StageTimer:
    """Nipype ``status_callback``: per-stage wall time, failures and progress lines."""

    def __init__(self, runs: dict[str, SubjectRun], total_nodes: int):
        self.runs = runs
        self.total = max(total_nodes, 1)
        self.done = 0
        self.started: dict[str, float] = {}
        self.t0 = time.monotonic()

    @staticmethod
    def _split(fullname: str) -> tuple[str | None, str]:
        parts = fullname.split(".")
        # arborseg_wf.<subject>_wf.<wf>[.<stage>_wf].<node>
        subject = parts[1] if len(parts) > 2 else None
        inner = parts[2:-1]
        if inner and inner[0] == "anat_preproc_wf" and len(inner) > 1:
            stage = inner[1]
        elif inner:
            stage = inner[0]
        else:
            stage = parts[-1]
        return subject, stage.removesuffix("_wf")

    def __call__(self, node, status: str) -> None:
        name = node.fullname
        subject, stage = self._split(name)
        run = self.runs.get(subject or "")
        if status == "start":
            self.started[name] = time.monotonic()
            return
        seconds = time.monotonic() - self.started.pop(name, time.monotonic())
        self.done += 1
        if run is None:
            return
        run.stage_seconds[stage] = run.stage_seconds.get(stage, 0.0) + seconds
        if status == "exception":
            run.failed_nodes.append(name)
            LOGGER.error("%s | %s failed after %.1f s", run.inputs.label, stage, seconds)
        elif seconds >= 1.0:
            elapsed = time.monotonic() - self.t0
            LOGGER.info("%s | %-24s %6.1f s   [%d/%d steps, %.0f s elapsed]", run.inputs.label, stage, seconds,
                        self.done, self.total, elapsed)


def preflight(run: SubjectRun) -> None:
    """Check the images of one subject before any work; mark it failed with one clear line."""
    from ..core.images import describe_image, load_anatomical

    inputs = run.inputs
    run.warnings.extend(inputs.notes)
    if inputs.t1w is None:
        run.status, run.error = "failed", f"{inputs.label}: no T1w image found (anat/*_T1w.nii[.gz])"
        return
    for suffix, path in (("T1w", inputs.t1w), ("T2w", inputs.t2w), ("FLAIR", inputs.flair)):
        if path is None:
            continue
        entry = {"path": str(path), "suffix": suffix, "used": suffix == "T1w",
                 "note": "" if suffix == "T1w" else "kept for later stages"}
        try:
            entry.update(describe_image(path))
        except Exception:  # the full check below says what is wrong
            pass
        run.input_summary.append(entry)
    try:
        _img, warnings = load_anatomical(inputs.t1w)
    except ArborSegError as exc:
        run.status, run.error = "failed", str(exc)
        return
    run.warnings.extend(warnings)


def _count_nodes(wf) -> int:
    """Nodes that really run (identity nodes are removed by Nipype before execution)."""
    from nipype.interfaces.utility import IdentityInterface

    return sum(1 for n in wf._get_all_nodes() if not isinstance(n.interface, IdentityInterface))


def _crash_message(crash_dir: Path, node_names: list[str], since: float) -> str | None:
    """The last exception line of the crash file of the first failed node."""
    if not crash_dir.is_dir():
        return None
    for fullname in node_names:
        short = fullname.split(".")[-1]
        for crash in sorted(crash_dir.glob(f"crash-*{short}*.txt")):
            if crash.stat().st_mtime + 1 < since:
                continue
            lines = [ln.strip() for ln in crash.read_text(errors="replace").splitlines() if ln.strip()]
            for line in reversed(lines):
                if "Error" in line.split(":")[0] or "Exception" in line.split(":")[0]:
                    return f"{fullname.split('.', 2)[-1]}: {line}"
            return f"{fullname}: failed (see {crash})"
    return None


def run_participant(config: RunConfig, *, clean_workdir: bool = False) -> int:
    """Run the participant level; returns the exit code."""
    from ..reports.build import software_versions, write_citation, write_record, write_subject_report
    from ..resources import places_from_config, resolve_template

    start = time.time()
    layout = load_layout(config.bids_dir, validate=not config.skip_bids_validation)
    subjects = collect_anatomical(layout, participant_label=config.participant_label,
                                  session_label=config.session_label, bids_filters=config.bids_filters)
    if not subjects:
        raise DatasetError(f"{config.bids_dir}: no subject/session matches the selection")
    runs = {s.workflow_name.removesuffix("_wf") + "_wf": SubjectRun(inputs=s) for s in subjects}
    LOGGER.info("ArborSeg %s | %d subject/session(s) selected | output: %s", config.version, len(runs),
                config.output_dir)

    template = None
    if not config.reports_only:  # every resource is checked before anything is written
        template = resolve_template(config.template, places=places_from_config(config),
                                    registration_resolution=config.preproc.registration_resolution)

    logs = config.output_dir / "logs"
    config.output_dir.mkdir(parents=True, exist_ok=True)
    write_dataset_description(config.output_dir, bids_dir=config.bids_dir, version=config.version)
    atomic_write_text(logs / f"config-{config.run_uuid}.toml", config.to_toml())
    versions = software_versions()

    if config.reports_only:
        return _reports_only(config, runs, versions)

    seg = config.segmentation
    if seg.active:
        LOGGER.info("whole-brain segmentation: %d model(s) (%s, %s protocol), %d MC-dropout samples, device %s",
                    len(seg.checkpoints), seg.origin, seg.protocol, seg.mc_samples, config.device)
    elif seg.enabled:
        LOGGER.warning("whole-brain segmentation skipped: %s", seg.reason)
    parc = config.parcellation
    if parc.active:
        LOGGER.info("cortical parcellation: %d model(s) (%s, %s protocol), %d MC-dropout samples, device %s",
                    len(parc.checkpoints), parc.origin, parc.protocol, parc.mc_samples, config.device)
    elif parc.enabled:
        LOGGER.info("cortical parcellation not run: %s", parc.reason)
    cer = config.cerebellum
    if cer.active:
        LOGGER.info("cerebellar lobules: %d hemisphere + %d lobule model(s) (%s), %d MC-dropout samples, device %s",
                    len(cer.hemisphere_checkpoints), len(cer.lobule_checkpoints), cer.origin, cer.mc_samples,
                    config.device)
        if cer.use_prior:
            LOGGER.info("cerebellar lobules: atlas prior from the library %s", cer.library_dir)
        elif cer.population_prior:
            LOGGER.info("cerebellar lobules with the population prior %s (no subject-specific atlas prior: %s)",
                        cer.population_prior.name, cer.prior_reason)
        else:
            LOGGER.info("cerebellar lobules without the atlas prior: %s", cer.prior_reason)
        if cer.superres_active:
            LOGGER.info("cerebellum crop super-resolution (x2): %s", cer.superres_checkpoint.stem)
        else:
            LOGGER.info("cerebellum crop super-resolution not run: %s", cer.superres_reason)
        synth = cer.t2synth_checkpoint.stem if cer.t2synth_checkpoint else "no T2-synthesis model installed"
        LOGGER.info("cerebellum T2w (--cerebellum-t2 %s): %s", cer.t2_mode, {
            "auto": f"the subject's T2w when there is one, else synthetic ({synth})",
            "real": "the subject's T2w only", "synth": f"synthetic ({synth})", "none": "none"}[cer.t2_mode])
    elif cer.enabled:
        LOGGER.warning("cerebellar lobules skipped: %s", cer.reason)
    write_citation(config, versions)
    for run in runs.values():
        preflight(run)
        for warning in run.warnings:
            LOGGER.warning("%s", warning)
        if run.status == "failed":
            LOGGER.error("%s", run.error)
    ready = [r for r in runs.values() if r.status == "pending"]
    if ready:
        _execute(config, template, runs, ready)
    for run in ready:
        _check_outputs(config, run)

    for run in runs.values():
        record = write_record(config, run, versions=versions, template=config.template)
        report = write_subject_report(config.output_dir, record)
        LOGGER.info("%s | report: %s", run.inputs.label, report)
    if clean_workdir and all(r.status == "success" for r in runs.values()):
        shutil.rmtree(config.work_dir / "arborseg_wf", ignore_errors=True)
    return _summary(runs, time.time() - start)


def _execute(config: RunConfig, template, runs: dict[str, SubjectRun], ready: list[SubjectRun]) -> None:
    from nipype import config as ncfg

    from workflows.base import init_arborseg_wf

    crash_dir = config.output_dir / "logs" / "crash"
    ncfg.set("execution", "crashdump_dir", str(crash_dir))
    ncfg.set("execution", "crashfile_format", "txt")
    ncfg.set("execution", "stop_on_first_crash", str(config.stop_on_first_crash).lower())
    ncfg.set("monitoring", "enabled", "false")
    ncfg.set("execution", "poll_sleep_duration", "0.2")  # nipype's 2 s default idles between short steps
    nipype_level = "INFO" if config.verbosity >= 2 else "WARNING"
    for key in ("workflow_level", "interface_level", "utils_level"):
        ncfg.set("logging", key, nipype_level)
    from nipype import logging as nlogging

    nlogging.update_logging(ncfg)
    for name in ("nipype.workflow", "nipype.interface", "nipype.utils"):
        logging.getLogger(name).propagate = False
    # threads of ANTs/ITK in the worker processes (inherited from this environment)
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(config.omp_nthreads)
    os.environ["OMP_NUM_THREADS"] = str(config.omp_nthreads)
    if config.plugin not in (None, "Linear", "MultiProc") and not os.getenv("LOGNAME"):
        # nipype's SLURM/SGE/PBS/LSF/Condor plugins name jobs after $LOGNAME (KeyError when unset:
        # containers, cron, some batch environments)
        os.environ["LOGNAME"] = _login_name()

    config.work_dir.mkdir(parents=True, exist_ok=True)
    wf = init_arborseg_wf(subjects=[r.inputs for r in ready], bids_dir=config.bids_dir, output_dir=config.output_dir,
                          work_dir=config.work_dir, template=template, preproc=config.preproc,
                          omp_nthreads=config.omp_nthreads, random_seed=config.random_seed,
                          segmentation=config.segmentation, parcellation=config.parcellation,
                          cerebellum=config.cerebellum, device=config.device)
    wf.config["execution"].update({"crashdump_dir": str(crash_dir), "crashfile_format": "txt",
                                   "stop_on_first_crash": config.stop_on_first_crash,
                                   "poll_sleep_duration": 0.2})
    timer = StageTimer(runs, _count_nodes(wf))
    plugin, plugin_args = execution_plugin(config, timer)
    started = time.time()
    LOGGER.info("running %d subject workflow(s) with %s (nprocs=%d, omp-nthreads=%d), work dir %s", len(ready),
                plugin, config.nprocs, config.omp_nthreads, config.work_dir)
    notes: dict[str, str] = {}  # node -> why its cluster job ended without a crash file
    try:
        execgraph = wf.run(plugin=plugin, plugin_args=plugin_args)
    except RuntimeError as exc:  # nipype: "Workflow did not execute cleanly"
        LOGGER.debug("workflow ended with errors: %s", exc)
    else:
        if plugin in _GRAPH_PLUGINS:  # nipype returns once the jobs are submitted
            notes = _follow_graph_jobs(config, execgraph, runs, started)
    for run in ready:
        if run.failed_nodes:
            run.status = "failed"
            run.error = (_crash_message(crash_dir, run.failed_nodes, started) or notes.get(run.failed_nodes[0])
                         or f"failed at {run.failed_nodes[0]}")


def _login_name() -> str:
    import getpass

    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a UID without a passwd entry (docker --user, Singularity)
        return f"uid{os.getuid()}"


#: plugins that submit the whole graph at once and return; they do not take ``status_callback``
#: (Nipype warns and ignores it), and ArborSeg follows their jobs itself (``_follow_graph_jobs``).
#: Linear, MultiProc and the per-step batch plugins (SLURM, SGE, PBS, LSF, Condor) call it from this
#: process: for the batch plugins a step "starts" when submitted. SGEGraph and PBSGraph are not
#: offered: their jobs cannot be followed, so every subject would end as failed.
_GRAPH_PLUGINS = ("SLURMGraph",)


def execution_plugin(config: RunConfig, status_callback=None) -> tuple[str, dict]:
    """Nipype's plugin name and arguments for this run.

    ``--plugin``/``--plugin-args`` pass through to Nipype; without ``--plugin`` it is MultiProc with
    ``--nprocs`` processes (and ``--mem-gb``), or Linear for one process. The user's arguments win
    over the defaults set here.
    """
    plugin = config.plugin or ("MultiProc" if config.nprocs > 1 else "Linear")
    args: dict = {}
    if plugin == "MultiProc":
        args["n_procs"] = config.nprocs
        args["raise_insufficient"] = False
        if config.mem_gb:
            args["memory_gb"] = config.mem_gb
    if plugin == "SLURMGraph":
        # nipype's default, given explicitly: without it the plugin fails when plugin_args is empty
        # (AttributeError: 'SLURMGraphPlugin' object has no attribute '_dont_resubmit_completed_jobs')
        args["dont_resubmit_completed_jobs"] = False
    if plugin not in _GRAPH_PLUGINS and status_callback is not None:
        args["status_callback"] = status_callback
    args.update(config.plugin_args)
    return plugin, args


#: SLURM job states after which a job runs no more
_SLURM_ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED", "SPECIAL_EXIT", "REVOKED"}


def _follow_graph_jobs(config: RunConfig, execgraph, runs: dict[str, SubjectRun],
                       started: float) -> dict[str, str]:
    """Wait for the jobs a graph plugin submitted, then mark the nodes that failed.

    Nipype's graph plugins write one batch script per node into ``<work>/arborseg_wf/batch``, submit
    them with dependencies and return at once. For SLURMGraph the jobs of this run (their command is
    one of the batch scripts written now) are followed with ``squeue`` until none is pending or
    running; jobs left waiting on a dependency that failed (``DependencyNeverSatisfied``) are
    cancelled. Ctrl-C cancels every job of this run. Failed nodes come from the crash files written
    since ``started`` and from jobs that ended in another state than COMPLETED (time limit, memory,
    node failure); returns, per such node, the line that says so.
    """
    import networkx as nx

    batch_dir = config.work_dir / "arborseg_wf" / "batch"
    scripts = {str(p) for p in batch_dir.glob("batchscript_*.sh") if p.stat().st_mtime >= started - 1}
    nodes = list(nx.topological_sort(execgraph))
    order = [n.fullname for n in nodes]
    # batchscript_pyscript_<time>_<hierarchy>_<id>.sh (nipype.pipeline.plugins.tools.create_pyscript)
    by_script = {s: n.fullname for n in nodes for s in scripts if s.endswith(f"_{n._hierarchy}_{n._id}.sh")}
    ended = _wait_slurm(scripts, len(scripts))  # script -> (job id, final state)
    crashed = _crashed_nodes(config.output_dir / "logs" / "crash", started)
    notes = {by_script[s]: f"{by_script[s].split('.', 2)[-1]}: SLURM job {job} ended {state}"
             for s, (job, state) in ended.items() if state != "COMPLETED" and s in by_script}
    failed = [f for f in order if f in crashed or f in notes]
    for fullname in failed:
        run = runs.get(StageTimer._split(fullname)[0] or "")
        if run is not None:
            run.failed_nodes.append(fullname)
            LOGGER.error("%s | %s failed", run.inputs.label, fullname.split(".", 2)[-1])
    _stage_seconds_from_results(nodes, runs, started)
    return notes


def _stage_seconds_from_results(nodes, runs: dict[str, SubjectRun], started: float) -> None:
    """Per-stage times of a graph-plugin run (no ``status_callback``): the interface run times in the
    result files the jobs wrote since ``started`` (steps taken from the cache count nothing)."""
    for node in nodes:
        subject, stage = StageTimer._split(node.fullname)
        run = runs.get(subject or "")
        result_file = Path(node.output_dir()) / f"result_{node.name}.pklz"
        if run is None or not result_file.is_file() or result_file.stat().st_mtime < started - 1:
            continue
        try:
            runtime = node.result.runtime
        except Exception:  # an unreadable result: the step shows as failed elsewhere
            continue
        runtimes = runtime if isinstance(runtime, list) else [runtime]
        seconds = sum(getattr(r, "duration", 0.0) or 0.0 for r in runtimes)
        run.stage_seconds[stage] = run.stage_seconds.get(stage, 0.0) + seconds


def _wait_slurm(scripts: set[str], total: int, poll: float = 2.0) -> dict[str, tuple[str, str]]:
    """Poll ``squeue`` until no job whose command is one of ``scripts`` is pending or running."""
    import subprocess

    seen, ended, cancelled = set(), {}, set()
    last_log, failures = 0.0, 0
    # --user takes a uid too: works without a passwd entry for it (containers)
    cmd = ["squeue", "--noheader", "--states=all", f"--user={os.getuid()}", "--format=%i|%T|%r|%o"]
    try:
        while True:
            try:
                out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=60).stdout
                failures = 0
            except (OSError, subprocess.SubprocessError) as exc:
                failures += 1
                if failures >= 10:  # slurmctld unreachable for a while: stop waiting, report what is there
                    LOGGER.error("squeue keeps failing (%s); not waiting for the SLURM jobs any longer", exc)
                    break
                time.sleep(poll)
                continue
            active, never = {}, []
            for line in out.splitlines():
                job, state, reason, command = (line.split("|", 3) + ["", "", ""])[:4]
                if command.strip() not in scripts:
                    continue
                seen.add(command.strip())
                state = state.split()[0] if state else ""
                if state in _SLURM_ENDED:
                    ended[command.strip()] = (job, state)
                elif state == "PENDING" and "DependencyNeverSatisfied" in reason:
                    never.append(job)
                else:
                    active[job] = state
            if never:  # a step upstream failed: these wait forever on most clusters
                subprocess.run(["scancel", *never], capture_output=True)
                cancelled.update(never)
            if not seen and total:
                LOGGER.error("none of the %d SLURM jobs of this run is in the queue: did sbatch fail? Try one "
                             "line of work/arborseg_wf/batch/submit_jobs.sh by hand", total)
                break
            if not active and not never:
                break
            if time.monotonic() - last_log >= 30:
                running = sum(s == "RUNNING" for s in active.values())
                LOGGER.info("SLURM: %d running, %d waiting, %d of %d jobs ended", running,
                            len(active) - running, len(ended), total)
                last_log = time.monotonic()
            time.sleep(poll)
    except KeyboardInterrupt:
        mine = _slurm_jobs(cmd, scripts)
        if mine:
            LOGGER.error("interrupted: cancelling the %d SLURM jobs of this run", len(mine))
            subprocess.run(["scancel", *mine], capture_output=True)
        raise
    if cancelled:
        LOGGER.warning("cancelled %d SLURM jobs whose dependencies failed", len(cancelled))
    return {s: (job, state) for s, (job, state) in ended.items() if job not in cancelled}


def _slurm_jobs(cmd: list[str], scripts: set[str]) -> list[str]:
    """Ids of the jobs of this run that are still pending or running."""
    import subprocess

    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    jobs = []
    for line in out.splitlines():
        job, state, _reason, command = (line.split("|", 3) + ["", "", ""])[:4]
        if command.strip() in scripts and (state.split() or [""])[0] not in _SLURM_ENDED:
            jobs.append(job)
    return jobs


def _crashed_nodes(crash_dir: Path, since: float) -> set[str]:
    """Full names of the nodes with a crash file written since ``since`` (first line ``Node: <name>``)."""
    names = set()
    if crash_dir.is_dir():
        for crash in crash_dir.glob("crash-*.txt"):
            if crash.stat().st_mtime + 1 < since:
                continue
            with open(crash, errors="replace") as fh:
                first = fh.readline().strip()
            if first.startswith("Node: "):
                names.add(first.removeprefix("Node: "))
    return names


def _check_outputs(config: RunConfig, run: SubjectRun) -> None:
    """A subject is a success only when its main derivatives exist."""
    from ..bids import derivative_path, seg_entity, source_entities

    if run.status == "failed":
        return
    ents = source_entities(run.inputs.t1w)
    required = [dict(ents, desc="preproc", suffix="T1w", extension=".nii.gz")]
    if config.segmentation.active:
        required.append(dict(ents, segmentation="wholebrain", suffix="qc", extension=".json"))
    if config.parcellation.active:
        required.append(dict(ents, segmentation=seg_entity(config.parcellation.protocol), suffix="qc",
                             extension=".json"))
    if config.cerebellum.active:
        required.append(dict(ents, segmentation="cerebellum", suffix="qc", extension=".json"))
    if all((config.output_dir / derivative_path(e)).is_file() for e in required):
        run.status = "success"
    else:
        run.status = "failed"
        run.error = run.error or ("not run: an earlier failure stopped the run (--stop-on-first-crash)"
                                  if config.stop_on_first_crash else "outputs missing after the run")


def _reports_only(config: RunConfig, runs: dict[str, SubjectRun], versions) -> int:
    from ..reports.build import read_record, write_subject_report

    missing = 0
    for run in runs.values():
        record = read_record(config.output_dir, run.inputs.label)
        if record is None:
            missing += 1
            run.status, run.error = "failed", f"{run.inputs.label}: no earlier run found in {config.output_dir}/logs"
            LOGGER.error("%s", run.error)
            continue
        run.status = record.get("status", "failed")
        run.error = record.get("error")
        LOGGER.info("%s | report: %s", run.inputs.label, write_subject_report(config.output_dir, record))
    return EXIT_PARTICIPANT_FAILED if missing else EXIT_OK


def _summary(runs: dict[str, SubjectRun], seconds: float) -> int:
    width = max(len(r.inputs.label) for r in runs.values())
    LOGGER.info("summary (%.0f s):", seconds)
    for run in runs.values():
        line = f"  {run.inputs.label:<{width}}  {run.status.upper():<8}"
        if run.error:
            line += f"  {run.error}"
        (LOGGER.info if run.status == "success" else LOGGER.error)("%s", line)
    failed = [r for r in runs.values() if r.status != "success"]
    LOGGER.info("%d succeeded, %d failed", len(runs) - len(failed), len(failed))
    return EXIT_PARTICIPANT_FAILED if failed else EXIT_OK

