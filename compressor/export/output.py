"""The output folder: written whole or not at all, by one run at a time, never over someone else's folder.

``atomic_output_dir`` yields a temporary folder beside the output (``.NAME.partial-PID``) that becomes the
output only when the block completes. Replacing an existing output (``--overwrite``) exchanges the two
folders in one ``renameat2(RENAME_EXCHANGE)`` where the kernel has it, so a reader never sees the output
missing and no kill can lose it; elsewhere the two renames run with SIGINT and SIGTERM blocked, and the
next run puts back an output a SIGKILL left renamed. A lock file (``.NAME.lock``) refuses a second run to
the same output while the first runs. Folders that killed runs left behind are removed by the next run, unless
it resumes one (``--resume``: a folder with committed blocks, ``compressor/resume.py``).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import glob
import os
import shutil
import signal
from pathlib import Path

from compressor.errors import UserError

MARKER = "compressor.json"  # every output we write has it: --overwrite replaces only folders that do


class ExportError(UserError):
    pass


@contextlib.contextmanager
def atomic_output_dir(output: str | Path, overwrite: bool = False, protected: list[Path] = (), resume: bool = False):
    """Yield a temporary folder that becomes ``output`` only if the block completes.

    A temporary folder that holds committed blocks or training progress (``compressor/resume.py``) is kept when a
    signal or a lost rank stops the run; with ``resume`` the latest such folder of a dead run is adopted (renamed to
    this run's)."""
    output = Path(output).resolve()
    check_target(output, overwrite, protected)
    created = make_parents(output.parent)
    try:
        with output_lock(output):
            recover_interrupted_swaps(output)
            adopted = resumable_partial(output) if resume else None
            temporary = output.parent / f".{output.name}.partial-{os.getpid()}"
            if adopted is not None and adopted != temporary:
                adopted.rename(temporary)
            remove_abandoned_partials(output)
            if adopted is None:
                shutil.rmtree(temporary, ignore_errors=True)
                try:
                    temporary.mkdir()
                except OSError as error:
                    raise ExportError(f"{output}: cannot write beside it ({error.strerror})") from None
            try:
                yield temporary
            except BaseException as error:
                if not (holds_commits(temporary) and stopped_from_outside(error)):
                    shutil.rmtree(temporary, ignore_errors=True)
                raise
            put_in_place(temporary, output)
    except BaseException:
        remove_empty(created)
        raise


def check_target(output: Path, overwrite: bool, protected) -> None:
    for path in protected:
        path = Path(path).resolve()
        if output == path or path in output.parents or output in path.parents:
            raise ExportError(f"{output}: the output must not be, contain or lie inside the input model folder {path}")
    if len(output.name.encode()) > 200:
        raise ExportError(f"{output.name[:40]}...: the output's name is longer than 200 bytes")
    if output.is_file() or output.is_symlink():
        raise ExportError(f"{output}: is a file, not an output folder")
    if output.exists() and not overwrite:
        raise ExportError(f"{output}: already exists (pass --overwrite to replace it)")
    if output.exists() and any(output.iterdir()) and not (output / MARKER).is_file():
        raise ExportError(f"{output}: is not a compressor output (no {MARKER}); --overwrite replaces only those")


def check_free_space(output: str | Path, expected_bytes: int) -> None:
    """Refuse, before any work, an output whose disk has less free space than the checkpoint will take."""
    folder = Path(output).resolve().parent
    while not folder.exists():
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if free < expected_bytes:
        raise ExportError(
            f"{output}: its disk has {free / 1e9:.2f} GB free, and the checkpoint will take about "
            f"{expected_bytes / 1e9:.2f} GB"
        )


def make_parents(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; the ones created, outermost first (removed on failure)."""
    missing = [p for p in (folder, *folder.parents) if not p.exists()][::-1]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        remove_empty(missing)
        raise ExportError(f"{folder}: cannot create the output's folder ({error.strerror})") from None
    return missing


def remove_empty(folders: list[Path]) -> None:
    for folder in reversed(folders):
        with contextlib.suppress(OSError):
            folder.rmdir()


@contextlib.contextmanager
def output_lock(output: Path):
    """Hold ``.NAME.lock`` for the run: a second run to the same output is refused while this one runs."""
    path = output.parent / f".{output.name}.lock"
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ExportError(f"{output}: another compressor run is writing it") from None
        if not path.exists() or os.stat(path).st_ino != os.fstat(handle.fileno()).st_ino:
            raise ExportError(f"{output}: another compressor run is writing it")  # it replaced the lock file
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                path.unlink()


def put_in_place(temporary: Path, output: Path) -> None:
    """``temporary`` becomes ``output``; an output already there is exchanged in one step and removed."""
    if not output.exists():
        temporary.rename(output)
    elif exchange(temporary, output):
        shutil.rmtree(temporary, ignore_errors=True)  # the old output, now under the temporary name
    else:
        retired = output.parent / f".{output.name}.old-{os.getpid()}"
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            output.rename(retired)
            temporary.rename(output)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        shutil.rmtree(retired, ignore_errors=True)


def exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2`` with ``RENAME_EXCHANGE``); False where unsupported."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    if ctypes.get_errno() in (errno.EINVAL, errno.ENOSYS, errno.EPERM):
        return False
    raise ExportError(f"{b}: could not replace it ({os.strerror(ctypes.get_errno())})")


def recover_interrupted_swaps(output: Path) -> None:
    """An output a SIGKILL left renamed to ``.NAME.old-PID`` between the two renames goes back in place;
    one left beside a complete new output is removed."""
    for retired in output.parent.glob(f".{glob.escape(output.name)}.old-*"):
        pid = retired.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not process_alive(int(pid)):
            if output.exists():
                shutil.rmtree(retired, ignore_errors=True)
            else:
                retired.rename(output)


def remove_abandoned_partials(output: Path) -> None:
    """Temporary folders of earlier runs for this output whose process is gone (killed with -9, say)."""
    for partial in output.parent.glob(f".{glob.escape(output.name)}.partial-*"):
        pid = partial.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(partial, ignore_errors=True)


def holds_commits(partial: Path) -> bool:
    """Whether a temporary folder holds committed blocks or training progress that ``--resume`` continues from."""
    folder = partial / "resume"
    return (folder / "committed.json").is_file() or any(folder.glob("progress-*.pt"))


def stopped_from_outside(error: BaseException) -> bool:
    """A run a signal or Ctrl-C stopped, or one that lost another rank of its run, keeps its committed blocks for
    ``--resume``, and so does a resume refused for a changed fingerprint (the progress stays for the right
    recipe); one that failed by itself (a bug, a refusal) leaves nothing, as before."""
    from compressor.distributed import lost_contact
    from compressor.resume import ResumeError

    return not isinstance(error, Exception) or lost_contact(error) or isinstance(error, ResumeError)


def resumable_partial(output: Path) -> Path | None:
    """The most recently committed temporary folder of a dead run for ``output`` (None: there is none)."""
    found = []
    for partial in output.parent.glob(f".{glob.escape(output.name)}.partial-*"):
        pid = partial.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not process_alive(int(pid)) and (partial / "resume" / "fingerprint.json").is_file():
            found.append(partial)
    return max(found, key=lambda p: (p / "resume").stat().st_mtime, default=None)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
