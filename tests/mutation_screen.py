"""In-process mutant screen for mutmut's mutants (a pytest plugin; docs/mutation-testing.md).

`mutmut run` starts one pytest per mutant and rebuilds every module fixture (a calibrated tiny teacher, saved
checkpoints) each time: 2,275 mutants take 22 min on an idle 2-core machine and hours on a loaded one. This plugin runs
inside ONE pytest session in mutants/ (after `mutmut run` has generated the mutants and collected its stats): every
fixture is set up once with no mutant active, then for each mutant its covering tests (mutmut's own
mutmut-stats.json), fastest first, run with the mutant active during the test call only, stopping at the first
failure. A failure counts as a kill only if the same test then passes with no mutant (otherwise every fixture is
rebuilt and the mutant tried again). Module fixtures are promoted to session scope, so switching modules costs nothing.
It differs from mutmut in one way: fixtures are built without the mutant. A mutant that shows only while a fixture is
built goes unseen here, and a test comparing a fresh call with a fixture built by the same function can fail here
where mutmut (both sides mutated) would pass; confirm what matters with `mutmut run NAME ...`.

    env MUTFAST_NAMES=names.txt MUTFAST_OUT=screen.json [MUTFAST_CAP=2] [MUTFAST_TIMEOUT=30] [MUTFAST_ALSO=a.py,b.py]
    (cd mutants && PYTHONPATH=../tests python -m pytest -p mutation_screen --rootdir=. -q -p no:randomly \
        -p no:cacheprovider <[tool.mutmut] test selection> -m "not slow" --deselect ...)

MUTFAST_CAP skips tests whose call took longer (seconds, mutmut's stats); MUTFAST_OUT gets name -> status (killed,
survived, no tests, timeout) and OUT.killers the test that killed each.
"""
import json
import os
import signal
import time

from _pytest.runner import call_and_report

NAMES = os.environ["MUTFAST_NAMES"]
OUT = os.environ["MUTFAST_OUT"]
CAP = float(os.environ.get("MUTFAST_CAP", "1e9"))
TIMEOUT = int(os.environ.get("MUTFAST_TIMEOUT", "30"))
ALSO = set(filter(None, os.environ.get("MUTFAST_ALSO", "").split(",")))  # test files run for every mutant
KILLERS = {}


class Timeout(BaseException):
    pass


def _alarm(signum, frame):
    raise Timeout()


class _Parents:
    """A `nextitem` for teardown that needs the item's collectors (module fixtures stay) but not the item itself."""

    def __init__(self, item):
        self.chain = item.listchain()[:-1]

    def listchain(self):
        return self.chain


def _set(name):
    os.environ["MUTANT_UNDER_TEST"] = name
    from mutmut.mutation.trampoline import set_mutant_under_test
    set_mutant_under_test(name)


def _run(session, item, mutant):
    """'pass', 'fail', 'timeout' or 'setup error' of one test with `mutant` active during its call only."""
    _set("")
    session._setupstate.teardown_exact(item)  # drop the fixtures of other modules, keep this one's
    item._initrequest()  # fresh function-scoped fixtures (tmp_path, monkeypatch) on every run, as pytest-rerunfailures
    rep = call_and_report(item, "setup", log=False)
    if not rep.passed:
        call_and_report(item, "teardown", log=False, nextitem=None)
        return "setup error"
    _set(mutant)
    signal.alarm(TIMEOUT)
    try:
        rep = call_and_report(item, "call", log=False)
        out = "fail" if rep.failed else "pass"
        if rep.failed and os.environ.get("MUTFAST_DEBUG"):
            print("FAIL", mutant, item.nodeid, str(rep.longrepr)[-800:], flush=True)
    except Timeout:
        out = "timeout"
    finally:
        signal.alarm(0)
        _set("")
    call_and_report(item, "teardown", log=False, nextitem=_Parents(item))
    return out


def _screen(session, items, tests, name):
    for t in tests:
        out = _run(session, items[t], name)
        if out == "pass":
            continue
        if _run(session, items[t], "") != "pass":  # fails without the mutant too: polluted state
            return "polluted", t
        return ("killed" if out == "fail" else out), t
    return ("survived" if tests else "no tests"), None


def pytest_runtestloop(session):
    from _pytest.scope import Scope

    # module fixtures live for the whole session (set up once, with no mutant), so switching modules costs nothing
    for by_node in session._fixturemanager._arg2node2fixturedefs.values():
        for fd in (fd for defs in by_node.values() for fd in defs):
            if fd._scope in (Scope.Module, Scope.Class, Scope.Package):
                fd._scope = Scope.Session
    stats = json.load(open("mutmut-stats.json"))
    by_fn, dur = stats["tests_by_mangled_function_name"], stats["duration_by_test"]
    items = {it.nodeid: it for it in session.items}
    names = [l.strip() for l in open(NAMES) if l.strip()]
    done = json.load(open(OUT)) if os.path.exists(OUT) else {}
    signal.signal(signal.SIGALRM, _alarm)
    t0 = time.time()
    for i, name in enumerate(names):
        if name in done:
            continue
        fn = name.partition("__mutmut_")[0]
        covering = set(by_fn.get(fn, ()))
        if "register" in fn:  # decorators run at import: their direct tests, whatever the stats saw
            covering |= {t for t in items if t.startswith("tests/test_registries.py::")}
        covering |= {t for t in items if t.split("::")[0] in ALSO}  # tests newer than mutmut's stats
        tests = sorted((t for t in covering if t in items and dur.get(t, 0) <= CAP), key=lambda t: (dur.get(t, 0), t))
        status, killer = _screen(session, items, tests, name)
        if status == "polluted":  # rebuild every fixture, then once more
            _set("")
            session._setupstate.teardown_exact(None)
            status, killer = _screen(session, items, tests, name)
            if status == "polluted":
                session._setupstate.teardown_exact(None)
        done[name] = status
        if killer:
            KILLERS[name] = killer
        if i % 20 == 0 or i == len(names) - 1:
            json.dump(done, open(OUT, "w"), indent=0)
            json.dump(KILLERS, open(OUT + ".killers", "w"), indent=0)
            print(f"{i + 1}/{len(names)} {time.time() - t0:.0f}s", flush=True)
    json.dump(done, open(OUT, "w"), indent=0)
    json.dump(KILLERS, open(OUT + ".killers", "w"), indent=0)
    _set("")
    return True
