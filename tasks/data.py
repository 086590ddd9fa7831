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
"""

from __future__ import annotations

import csv
import json
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Iterator

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
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise DataError(f"{where}: not valid JSON ({error})") from None
        if not isinstance(data, list):
            raise DataError(f"{where}: expected a JSON array of row objects, got {type(data).__name__}")
        return where, list(enumerate(data, start=1))
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as error:  # pyarrow raises several types for a corrupt file
            raise DataError(f"{where}: not a readable parquet file ({error})") from None
        return where, list(enumerate(table.to_pylist(), start=1))
    if suffix == ".csv":
        with path.open(encoding="utf-8", newline="") as handle:
            return where, [(number, dict(row)) for number, row in enumerate(csv.DictReader(handle), start=1)]
    raise ValueError(f"{path}: unsupported data file type '{suffix}'; use {', '.join(SUFFIXES)}")


def _jsonl_rows(path: Path) -> Iterator[tuple[int, Any]]:
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{path}: row {number}: not valid JSON ({error.msg})") from None


def hub_rows(
    hub_id: str, config: str | None, split: str, task: str, data_files: str | None = None
) -> tuple[str, list[tuple[int, Any]]]:
    """Rows of a hub dataset split through `datasets`; a failure becomes one line suggesting --data.

    data_files: read this JSON-lines file URL (e.g. "zip://data/x.jsonl::hf://datasets/ORG/NAME/data.zip")
    instead of the dataset's own configs, for hub datasets whose loading script `datasets` no longer runs.
    """
    where = f"{hub_id}" + (f" ({config})" if config else "") + f" [{split}]"
    try:
        import datasets

        if data_files is not None:
            dataset = datasets.load_dataset("json", data_files={split: data_files}, split=split)
        else:
            dataset = datasets.load_dataset(hub_id, config, split=split)
    except Exception as error:  # network, missing config, script datasets: all end the same way
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(
            f"could not load {where} from the Hugging Face hub ({reason}); "
            f"download it and pass --data {task}=PATH (a jsonl/json/parquet/csv file or a folder)"
        ) from None
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
    """Checked rows from `data_path` (file, or `name.<ext>` in a folder; name defaults to split) or the hub."""
    if data_path is None:
        where, rows = hub_rows(hub_id, hub_config, split, task)
    else:
        where, rows = local_rows(data_path, name or split)
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
