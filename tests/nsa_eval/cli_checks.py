"""What the CLI tests share: `nsa-eval` invoked in-process, and the check that bad input ends in one line."""

from click.testing import CliRunner

from nsa_eval.cli import main


def invoke(*args):
    """`nsa-eval ARGS...` through click's test runner (stdout and stderr together); an exception the CLI does not
    turn into a line propagates, with its traceback."""
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def assert_one_line_error(result, *fragments, alone=False):
    """Exit code 1, no traceback, and the output ends in exactly one `Error: ...` line holding every fragment (progress
    lines such as `loading ...` may come before it; alone: nothing may)."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.output
    assert not alone or len(lines) == 1, result.output
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
