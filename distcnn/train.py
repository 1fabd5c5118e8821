"""`python -m distcnn.train`: the command-line shell over distcnn.trainer.

One process, or data-parallel under `mpirun -n N` / `mpiexec -n N` / `srun`: the same code path,
with a communicator of size 1 or N. The order of things matters here:
  1. parse the flags (standard library only);
  2. start MPI and count the ranks on this node (mpi4py does not import NumPy);
  3. set the BLAS thread count, THEN import NumPy and the numeric modules;
  4. settle everything that can be wrong with the input before training, agreeing across ranks,
     so a bad flag or file ends every rank with exit code 2 and one message;
  5. train, with any failure on any rank turned into an abort of the whole job.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import sys
from typing import TYPE_CHECKING, Any

from distcnn import rundir, signals
from distcnn.errors import UsageError
from distcnn.rundir import RunDir

if TYPE_CHECKING:
    from distcnn.config import Config


def _error(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr, flush=True)
    return 2


def main(argv: list[str] | None = None) -> int:
    # First thing, before MPI starts and NumPy loads: SIGTERM/SIGUSR1/SIGINT only set a flag
    # from here on, which the ranks agree on at the next setup check or step (signals.py).
    # The handlers stay until the process exits, so a signal after the run cannot kill it.
    signals.STOP.clear()
    signals.STOP.install()
    try:  # mpi4py's MPI, or a one-process stand-in when no MPI library is installed
        from distcnn.mpienv import MPI
    except UsageError as e:  # several ranks launched, no MPI library: what to install
        return _error(str(e)) if getattr(e, "rank", 0) == 0 else 2

    world = MPI.COMM_WORLD
    rank = world.Get_rank()
    from distcnn import config

    out = io.StringIO()
    err, flags = None, {}
    try:
        # --help / --version print on rank 0 only
        with contextlib.redirect_stdout(out if rank else sys.stdout):
            flags = config.parse_flags(argv)
    except UsageError as e:
        err = str(e)
    except SystemExit:  # --help / --version: done, on every rank (one printed it)
        raise
    from distcnn import agree

    # Rank 0 reads --config (bounded: a regular file of at most 1 MiB, so it cannot hang) and
    # every rank gets its settings; the thread count they name must be known before NumPy loads.
    toml: dict[str, Any] = {}
    if err is None and rank == 0 and flags.get("config"):
        try:
            toml = config.read_toml(flags["config"])
        except UsageError as e:
            err = str(e)
    # MPI: point to point with a deadline, carrying rank 0's --config settings: a flag refused
    # on some ranks only (MPMD launches, another command line per host) or a rank that never
    # gets here cannot leave the others waiting in a collective
    wait = flags.get("collective_timeout") or config.DEFAULTS["collective_timeout"]
    err, toml = agree.early_settle(world, err, wait, toml)
    if err:
        return _error(err) if rank == 0 else 2

    from distcnn import threads

    node = world.Split_type(MPI.COMM_TYPE_SHARED)
    if "threads" in flags:
        n_threads, source = flags["threads"], "--threads"
    elif toml.get("threads") is not None:
        n_threads, source = toml["threads"], "--config"
    else:
        n_threads, source = threads.choose(None, node.Get_size())
    node.Free()
    threads.apply(n_threads)

    from distcnn.comm import Comm, run_or_abort

    # The watchdog guards setup too (a rank stuck reading a checkpoint on a stalled file
    # system); the resolved --collective-timeout replaces this once the config is known.
    timeout = flags.get("collective_timeout", toml.get("collective_timeout"))
    if not (isinstance(timeout, float) and 0 < timeout <= 1e9):
        timeout = config.DEFAULTS["collective_timeout"]
    comm = Comm(world, timeout=timeout)
    return run_or_abort(lambda: _run(flags, toml, comm, n_threads, source), comm)


def _agree(comm: Any, err: str | None) -> int | None:
    """MPI: every rank learns the first error any rank hit during setup (a usage error: exit
    2) or a stop signal any rank got (exit 0, or 130 for SIGINT: nothing trained yet, so
    nothing to save); None when setup goes on. Rank 0 prints the one line."""
    # MPI: point to point, so a rank whose setup failed alone (while the others went on into
    # a collective) still ends the job with its own message, within seconds (Comm.settle)
    err = comm.settle(err, "setup check")
    if err:
        return _error(err) if comm.rank == 0 else 2
    return _stop_check(comm)


def _stop_check(comm: Any) -> int | None:
    """MPI: whether any rank got a stop signal during start-up; the exit code if so."""
    stop = signals.STOP
    got = comm.gather_objects((stop.requested, stop.interrupted), "start-up signals")  # MPI
    if any(requested for requested, _ in got):
        interrupted = any(i for _, i in got)
        what, code = ("interrupted", 130) if interrupted else ("preempted", 0)
        if comm.rank == 0:
            print(
                f"{what} ({signals.describe(stop, interrupted)}) during start-up, before any "
                f"step: nothing to save; exiting {code}",
                flush=True,
            )
        return code
    return None


def _run(
    flags: dict[str, Any], toml: dict[str, Any], comm: Any, n_threads: int, thread_source: str
) -> int:
    from distcnn import config

    # Rank 0 decides what to resume from; everyone gets the decision and the stored config.
    decision: dict[str, Any] = {}
    loaded = None  # rank 0: the whole checkpoint resumed from; the others get its metadata
    if comm.rank == 0:
        try:
            decision, loaded = _resume_decision(flags, toml)
        except UsageError as e:
            decision = {"error": str(e)}
    decision = comm.bcast_object(decision, 0, "resume decision")  # MPI
    if decision.get("error"):
        return _error(decision["error"]) if comm.rank == 0 else 2

    err = None
    run = None  # rank 0: the run directory, once its lock is held
    cfg: Config | None = None
    warnings: list[str] = []
    resume = None
    try:
        cfg, warnings = config.resolve(flags, decision.get("config"), toml)
        warnings = decision.get("notes", []) + warnings
        comm.timeout = float(cfg.collective_timeout)
        from distcnn import threads

        if cfg.threads is not None and cfg.threads != n_threads:
            # inherited from the checkpoint's config (flags and TOML were applied before NumPy
            # loaded): set it now, through threadpoolctl
            n_threads, thread_source = cfg.threads, "the checkpoint's config"
            threads.apply(n_threads)
        elif cfg.deterministic and cfg.threads is None and n_threads != 1:
            # Bitwise reproducibility across rank counts needs the same BLAS partitioning on
            # every rank: pin one thread unless --threads names the count.
            n_threads, thread_source = 1, "--deterministic"
            threads.apply(1)
    except UsageError as e:
        err = str(e)
    from distcnn import agree

    # MPI: config, model, dataset and versions agree with rank 0's (an error above joins the
    # same gather, so a rank that failed alone is named); rank 0 prints the rank table
    err, rank_table = agree.check(comm, None if err else cfg, err)
    if err:
        return _error(err) if comm.rank == 0 else 2
    if comm.rank == 0 and not cfg.dry_run:
        print("\n".join(rank_table), flush=True)
    try:
        if cfg.dry_run:
            dry_err = None
            if comm.rank == 0:
                try:
                    _dry_run(cfg, n_threads, thread_source, comm.size)
                except UsageError as e:
                    dry_err = str(e)
            # MPI: every rank learns rank 0's outcome (no rank left waiting in a collective)
            dry_err = comm.bcast_object(dry_err, 0, "dry run")
            return (_error(dry_err) if comm.rank == 0 else 2) if dry_err else 0
        resume = None
        if decision.get("path"):
            resume = loaded if comm.rank == 0 else decision["meta"]
        if comm.rank == 0:
            # the directory, its lock (a second live job ends here), its owner, the log
            run = RunDir(cfg.checkpoint_dir, decision["run_id"], cfg.log)
            new_run = not flags.get("resume", toml.get("resume"))
            warnings += run.prepare(new_run, decision.get("path"))
    except UsageError as e:
        err = str(e)
    try:
        return _train(
            cfg, comm, err, warnings, resume, decision, run, rank_table, n_threads, thread_source
        )
    finally:
        if run is not None:
            run.release()


def _train(
    cfg: Config,
    comm: Any,
    err: str | None,
    warnings: list[str],
    resume: Any,
    decision: dict[str, Any],
    run: RunDir | None,
    rank_table: list[str],
    n_threads: int,
    thread_source: str,
) -> int:
    """Build the trainer (after every rank passed setup) and run it; rank 0 holds `run`."""
    from distcnn import checkpoint as ckpt
    from distcnn.trainer import SaveFailed, Trainer

    code = _agree(comm, err)  # MPI: before the Trainer, whose construction is collective
    if code is not None:
        return code
    trainer = None
    try:
        trainer = Trainer(
            cfg, comm, warnings, resume, decision.get("path"), decision["run_id"], run
        )
        if comm.rank == 0:
            for p in ckpt.remove_stale_temporaries(cfg.checkpoint_dir):
                trainer.console.warn(f"removed {p}, left by an interrupted save")
    except UsageError as e:
        err = str(e)
    code = _agree(comm, err)  # MPI: a signal after this point stops the first step
    if code is not None:
        return code
    assert trainer is not None
    from distcnn import agree

    trainer.start()
    if trainer.state.step < trainer.total_steps:  # this attempt's ranks, in the metrics log
        trainer.console.record(agree.table_record(rank_table, trainer.state.step))
    if comm.rank == 0:
        print(f"run {decision['run_id']} in {cfg.checkpoint_dir}", flush=True)
        print(f"threads per rank: {n_threads} (from {thread_source})", flush=True)
        print("config: " + json.dumps(trainer.cfg.as_dict(), sort_keys=True), flush=True)
    try:
        return trainer.run()
    except SaveFailed as e:
        # every rank raised it (the outcome was broadcast), so all end here together: one
        # message, exit 1, no abort needed
        if comm.rank == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 1


def _resume_decision(flags: dict[str, Any], toml: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """On rank 0: which checkpoint to resume from (if any), as (a decision to broadcast: path,
    inherited config, metadata and notes; the loaded checkpoint, or None)."""
    from distcnn import checkpoint as ckpt
    from distcnn import config

    resume = flags.get("resume", toml.get("resume"))
    if not resume:
        return {"run_id": rundir.new_run_id()}, None
    notes: list[str] = []
    if resume == "auto":
        directory = flags.get("checkpoint_dir", toml.get("checkpoint_dir"))
        directory = directory or config.DEFAULTS["checkpoint_dir"]
        run_id = rundir.dir_run_id(directory)  # None: a directory from before run ids
        path, notes = ckpt.newest_valid(directory, run_id)
        if path is None and any("not verify" in n for n in notes):
            raise UsageError(
                f"--resume auto: no checkpoint in {directory} verifies ("
                + "; ".join(notes)
                + "); give --resume PATH of a good one, or move the damaged ones away"
            )
        if path is None:
            notes.append(f"--resume auto: no checkpoint in {directory}; starting fresh")
            return {"notes": notes, "run_id": run_id or rundir.new_run_id()}, None
    else:
        path = resume
    ck = ckpt.load(path)
    meta = dataclasses.replace(ck, params={}, velocity={}, optimizer_state={}, buffers={})
    notes.append(f"resuming from {path} at step {ck.step} (written by {ck.world_size} rank(s))")
    # settings marked inherit=False (e.g. --max-steps, which limits one invocation) are not
    # taken from the checkpoint; the others are type- and range-checked like flags
    inherited = config.check_stored(ck.config, str(path), set(flags) | set(toml))
    return {
        "path": str(path),
        "config": inherited,
        "meta": meta,
        "notes": notes,
        "run_id": ck.run_id or rundir.new_run_id(),  # a checkpoint from before run ids
    }, ck


def _dry_run(cfg: Config, n_threads: int, thread_source: str, ranks: int) -> None:
    import h5py

    from distcnn import data as datamod
    from distcnn.model import REFERENCE_SPEC, Model

    path = cfg.data or str(datamod.DEFAULT_DATASET)
    train = datamod.load_split(path, "train")
    with h5py.File(path, "r") as f:
        splits = {k: f[k]["labels"].shape[0] for k in f if isinstance(f[k], h5py.Group)}
    from distcnn.safefile import check_model_memory

    spec = cfg.model or REFERENCE_SPEC
    check_model_memory(spec, train.image_shape, train.num_classes, -(-cfg.batch_size // ranks))
    model = Model(spec, train.image_shape, train.num_classes)
    print("config: " + json.dumps(cfg.as_dict(), sort_keys=True))
    print(f"ranks: {ranks}, threads per rank: {n_threads} (from {thread_source})")
    print(f"data: {path} {splits}, image {train.image_shape}, {train.num_classes} classes")
    print(f"{'layer':<8} {'kind':<24} {'output':<16} {'params':>10} {'MFLOP/img':>10}")
    for name, desc, shape, count, flops in model.summary():
        print(f"{name:<8} {desc:<24} {str(shape):<16} {count:>10,} {flops / 1e6:>10.3f}")
    fwd = model.flops_per_sample()
    print(f"{'total':<8} {'':<24} {'':<16} {model.num_params:>10,} {fwd / 1e6:>10.3f}")
    print(f"train step ~{3 * fwd / 1e6:.2f} MFLOP per image (forward + backward)")


if __name__ == "__main__":
    from distcnn.errors import run_cli

    sys.exit(run_cli(main))
