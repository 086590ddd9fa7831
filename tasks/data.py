"""Benchmark rows: from a Hugging Face hub id (through `datasets`) or a local file or folder, checked.

A task states the fields it needs and their types (a schema); every row is checked against it, so a
malformed row ends in one `DataError` line naming the file, the row and the field, never in a KeyError
deep inside a prompt template.

Local sources (`--data TASK=PATH`):
- a file: `.jsonl` (one object a line; the row number is the line number), `.json` (an array of
  objects), `.parquet`, or `.csv` (a header row; integer cells and JSON-array cells such as
  `["a", "b"]` are read as such when the schema asks for them);
- a folder: the file `NAME.<ext>` inside it, where NAME is what the task looks for (a split such as
  `test` / `dev`, or a subset such as `qasper`).

Hub sources, offline first: the local `datasets` cache is tried before the network; with `HF_DATASETS_OFFLINE=1`
(or `HF_HUB_OFFLINE=1`) nothing else is; when the hub cannot be reached (a 3 s connection test) the error is one
line naming `--data TASK=PATH` at once, rather than after `huggingface_hub`'s retries.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import socket
import types
import typing
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator
from urllib.parse import urlparse

from nsa_eval.tasks.base import DataError

SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")

# name -> a type, a tuple of types (any of them), or list[T] (a list whose items are T)
Schema = dict[str, Any]


def find_data_file(folder: str | Path, name: str) -> Path | None:
    """`folder/name.<ext>` for the first supported extension present, else None."""
    for suffix in SUFFIXES:
        candidate = Path(folder) / f"{name}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def local_rows(path: str | Path, name: str | None = None) -> tuple[str, list[tuple[int, Any]]]:
    """(where, [(row number, row)]) read from a file, or from `name.<ext>` in a folder.

    Raises ValueError for a missing path or an unsupported suffix, DataError for an unreadable file.
    """
    if not str(path).strip():
        raise ValueError("the data path is empty; give a jsonl/json/parquet/csv file or a folder of them")
    path = Path(path)
    if path.is_dir():
        if name is None:
            raise ValueError(f"{path} is a folder; give a data file ({', '.join(SUFFIXES)})")
        found = find_data_file(path, name)
        if found is None:
            raise ValueError(f"{path} holds no {name}{{{','.join(SUFFIXES)}}}; add it or give the file itself")
        path = found
    elif not path.is_file():
        raise ValueError(f"data path {path} does not exist; give a {'/'.join(SUFFIXES)} file or a folder of them")
    where = str(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return where, list(_jsonl_rows(path))
    if suffix == ".json":
        try:
            data = json.loads(utf8_text(path))
        except json.JSONDecodeError as error:
            raise DataError(f"{where}: line {error.lineno}, column {error.colno}: not valid JSON ({error.msg})") from None
        if not isinstance(data, list):
            raise DataError(f"{where}: expected a JSON array of row objects, got {type(data).__name__}")
        return where, list(enumerate(data, start=1))
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as error:  # pyarrow raises several types for a corrupt file; its text may span lines
            raise DataError(f"{where}: not a readable parquet file ({' '.join(str(error).split())})") from None
        return where, list(enumerate(table.to_pylist(), start=1))
    if suffix == ".csv":
        lines = utf8_text(path).splitlines(keepends=True)
        return where, [(number, dict(row)) for number, row in enumerate(csv.DictReader(lines), start=1)]
    raise ValueError(f"{path}: unsupported data file type '{suffix}'; use {', '.join(SUFFIXES)}")


def _jsonl_rows(path: Path) -> Iterator[tuple[int, Any]]:
    for number, line in enumerate(utf8_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as error:
            end = len(line.rstrip())
            if error.msg.startswith("Unterminated string"):  # json points at the string's start, not the cut
                raise DataError(f"{path}: row {number}, column {end}: not valid JSON (the string opened at column "
                                f"{error.colno} is not closed by the row's end: cut short?)") from None
            raise DataError(f"{path}: row {number}, column {error.colno}: not valid JSON ({error.msg})") from None


def utf8_text(path: Path) -> str:
    """A data file's text; a byte that is not UTF-8 is a DataError naming the file, its line and column."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        column = error.start - (data.rfind(b"\n", 0, error.start) + 1) + 1
        raise DataError(f"{path}: line {line}, column {column}: not UTF-8 text (byte 0x{data[error.start]:02x}); "
                        "save the file as UTF-8") from None


def offline_env() -> bool:
    """Whether the user asked for no network: HF_DATASETS_OFFLINE or HF_HUB_OFFLINE set to a true value (as
    `datasets` read them at import, or in the environment now)."""
    import datasets.config

    return bool(datasets.config.HF_HUB_OFFLINE) or any(
        os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")
        for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))


def hub_endpoint() -> str:
    """The hub's address ($HF_ENDPOINT, else https://huggingface.co)."""
    return os.environ.get("HF_ENDPOINT", "").strip() or "https://huggingface.co"


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the hub opens within `timeout` seconds."""
    url = urlparse(hub_endpoint())
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", port), timeout=timeout):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """`datasets` and `huggingface_hub` in offline mode for the block: only the local cache is read."""
    import datasets.config
    import huggingface_hub.constants as hub_constants

    saved = datasets.config.HF_HUB_OFFLINE, getattr(datasets.config, "HF_DATASETS_OFFLINE", None), hub_constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    if saved[1] is not None:
        datasets.config.HF_DATASETS_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved[0], saved[2]
        if saved[1] is not None:
            datasets.config.HF_DATASETS_OFFLINE = saved[1]


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def _needs_network(error: BaseException | None) -> bool:
    """Whether an offline attempt failed for want of the network or the cache (an OSError such as datasets'
    ConnectionError or DatasetNotFoundError, anywhere in the chain of causes)."""
    seen = 0
    while error is not None and seen < 10:
        if isinstance(error, OSError):
            return True
        error, seen = error.__cause__ or error.__context__, seen + 1
    return False


def from_hub(load: Callable[[], Any], what: str, remedy: str) -> Any:
    """`load()` (something that calls datasets.load_dataset) from the local cache first, then from the hub when it
    can be reached. Every failure is one ValueError line ending in `remedy` (e.g. "pass --data gsm8k=PATH")."""
    try:
        with hub_offline():
            return load()
    except Exception as error:  # noqa: BLE001 - sorted below
        cached_error = error
    if not _needs_network(cached_error):  # a bad config or file: the network would not help
        if isinstance(cached_error, ValueError) and not type(cached_error).__module__.startswith(("datasets", "huggingface")):
            raise cached_error
        raise ValueError(f"could not load {what} ({_first_line(cached_error)}); {remedy}") from None
    if offline_env():
        raise ValueError(f"{what} is not in the local datasets cache and HF_DATASETS_OFFLINE/HF_HUB_OFFLINE is set "
                         f"({_first_line(cached_error)}); {remedy}") from None
    if not hub_reachable():
        raise ValueError(f"{what} is not in the local datasets cache and the Hugging Face hub ({hub_endpoint()}) "
                         f"cannot be reached; {remedy}") from None
    try:
        return load()
    except ValueError:
        raise
    except Exception as error:  # noqa: BLE001 - missing config, script datasets, HTTP errors: all end the same way
        raise ValueError(f"could not load {what} from the Hugging Face hub ({_first_line(error)}); {remedy}") from None


def hub_rows(
    hub_id: str, config: str | None, split: str, task: str, data_files: str | None = None
) -> tuple[str, list[tuple[int, Any]]]:
    """Rows of a hub dataset split through `datasets`, from the local cache first (see the module docstring); a
    failure becomes one line suggesting --data.

    data_files: read this JSON-lines file URL (e.g. "zip://data/x.jsonl::hf://datasets/ORG/NAME/data.zip")
    instead of the dataset's own configs, for hub datasets whose loading script `datasets` no longer runs.
    """
    where = f"{hub_id}" + (f" ({config})" if config else "") + f" [{split}]"

    def load() -> Any:
        import datasets

        datasets.disable_progress_bars()
        if data_files is not None:
            return datasets.load_dataset("json", data_files={split: data_files}, split=split)
        return datasets.load_dataset(hub_id, config, split=split)

    remedy = f"download it and pass --data {task}=PATH (a jsonl/json/parquet/csv file or a folder)"
    if data_files is not None and not any(scheme in data_files for scheme in ("hf://", "http://", "https://")):
        try:  # a local archive (tests, mirrors): no cache or network question to ask
            dataset = load()
        except Exception as error:  # noqa: BLE001
            raise ValueError(f"could not load {where} ({_first_line(error)}); {remedy}") from None
    else:
        dataset = from_hub(load, where, remedy)
    return where, list(enumerate(dataset, start=1))


def check_rows(
    where: str,
    rows: Iterable[tuple[int, Any]],
    schema: Schema,
    aliases: dict[str, tuple[str, ...]] | None = None,
    text_cells: bool = False,
) -> list[dict[str, Any]]:
    """Rows as dicts holding every schema field with the right type (aliases renamed to the field).

    aliases: field -> other names it may have in a source (e.g. MMLU's "subject" is "type" in some copies).
    text_cells: the rows come from a CSV file, whose text cells are converted where the schema asks for
    int or list.
    Raises DataError naming `where`, the row number and the field.
    """
    checked = []
    for number, row in rows:
        if not isinstance(row, dict):
            raise DataError(f"{where}: row {number}: expected an object with fields, got {type(row).__name__}")
        row = dict(row)
        for field, spec in schema.items():
            if field not in row:
                for alias in (aliases or {}).get(field, ()):
                    if alias in row:
                        row[field] = row[alias]
                        break
                else:
                    raise DataError(f"{where}: row {number}: field '{field}' is missing")
            value = row[field]
            if text_cells and isinstance(value, str):
                value = row[field] = _from_csv_cell(value, spec)
            if not _matches(value, spec):
                shown = repr(value)
                shown = shown if len(shown) <= 40 else shown[:37] + "..."
                raise DataError(
                    f"{where}: row {number}: field '{field}' should be {_describe(spec)}, "
                    f"got {type(value).__name__} {shown}"
                )
        checked.append(row)
    return checked


def load_rows(
    data_path: str | None,
    *,
    task: str,
    hub_id: str,
    hub_config: str | None,
    split: str,
    schema: Schema,
    aliases: dict[str, tuple[str, ...]] | None = None,
    name: str | None = None,
) -> list[dict[str, Any]]:
    """Checked rows from `data_path` (file, or `name.<ext>` in a folder; name defaults to split) or the hub; no rows
    at all is a DataError (a task on nothing would "succeed" with n=0)."""
    if data_path is None:
        where, rows = hub_rows(hub_id, hub_config, split, task)
    else:
        where, rows = local_rows(data_path, name or split)
    if not rows:
        raise DataError(f"{where} holds no rows; give {task} data with at least one row")
    return check_rows(where, rows, schema, aliases, text_cells=where.lower().endswith(".csv"))


def _matches(value: Any, spec: Any) -> bool:
    if isinstance(spec, tuple):
        return any(_matches(value, option) for option in spec)
    if typing.get_origin(spec) is list:
        (item,) = typing.get_args(spec)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if spec is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if spec is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if spec is None or spec is types.NoneType:
        return value is None
    return isinstance(value, spec)


def _describe(spec: Any) -> str:
    if isinstance(spec, tuple):
        return " or ".join(_describe(option) for option in spec)
    if typing.get_origin(spec) is list:
        return f"a list of {_describe(typing.get_args(spec)[0])}"
    if spec is None or spec is types.NoneType:
        return "null"
    return {str: "a string", int: "an integer", float: "a number", bool: "true/false", dict: "an object"}.get(
        spec, spec.__name__
    )


def _from_csv_cell(text: str, spec: Any) -> Any:
    """A CSV cell as the schema wants it: empty for null, int for int, a parsed JSON array for list."""
    options = spec if isinstance(spec, tuple) else (spec,)
    stripped = text.strip()
    if (None in options or types.NoneType in options) and stripped == "":
        return None
    if str in options:
        return text
    if int in options and stripped.lstrip("-").isdigit():
        return int(stripped)
    if any(typing.get_origin(o) is list for o in options) and stripped.startswith("["):
        try:
            return json.loads(stripped)
        except json.JSONDecodeError:
            return text
    return text
