"""Output folders of the conversions: refuse to replace a folder unasked, write into a hidden temporary sibling,
publish with one rename (safetensors_writer.py's machinery), under the same per-folder lock the export uses."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from molgen_export.hf import publish
from molgen_export.errors import OutputError

logger = logging.getLogger(__name__)


def check_output_dir(output_dir: Path, *, force: bool) -> None:
    """Refuse an existing, non-empty output folder unless `force` (then it is replaced atomically on success).

    Raises:
        OutputError: the folder exists (or is a file) and `force` is off.
    """
    if output_dir.is_file():
        raise OutputError(f"the output {output_dir} is a file", path=output_dir, hint="choose a folder path")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not force:
        raise OutputError(f"the output folder {output_dir} exists and is not empty", path=output_dir,
                          hint="choose another folder, or pass --force to replace it (replaced in one rename "
                               "once the new output is complete and verified)")


@contextmanager
def staged_output(output_dir: Path, *, force: bool) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success publish it as `output_dir`, on any error remove it.

    Raises:
        OutputError: `output_dir` exists and `force` is off, or it cannot be written.
        StepLockedError: another process is writing the same output.
    """
    from molgen_export.pipeline.export import step_lock

    output_dir = Path(output_dir)
    check_output_dir(output_dir, force=force)
    with step_lock(output_dir):
        publish.clean_stale_temp_dirs(output_dir.parent, output_dir.name)
        temp_dir = publish.make_temp_dir(output_dir.parent, output_dir.name)
        try:
            yield temp_dir
            publish.publish(temp_dir, output_dir)
        except BaseException:
            publish.remove_tree(temp_dir)
            raise
    logger.info("published %s", output_dir)
