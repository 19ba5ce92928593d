"""The SASS loop reader (fastnmf/profile/static/sass_loops.py) on SASS text shaped like
``nvdisasm -g -c`` output: nesting, own instructions, source lines, the command line."""

from __future__ import annotations

import pytest

from fastnmf.profile.static import sass_loops

# an outer loop (label .L_x_0, two branches back: the last one ends it) around an inner loop
# (.L_x_1), a forward branch that is no loop, and an instruction after the loops
SASS = """\
\t.section\t.text.k,"ax",@progbits
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
\t//## File "/src/kernels/k.py", line 10
        /*0010*/                   IMAD R2, R3, R4, RZ ;
        /*0020*/               @P1 BRA `(.L_x_2) ;
\t//## File "/src/kernels/k.py", line 12
        /*0030*/                   FFMA R5, R5, R5, R5 ;
.L_x_1:
\t//## File "/src/kernels/k.py", line 20
        /*0040*/                   FADD R6, R6, R6 ;
        /*0050*/                   SHFL.BFLY PT, R7, R6, 0x1, 0x1f ;
        /*0060*/               @P0 BRA `(.L_x_1) ;
.L_x_2:
\t//## File "/src/kernels/k.py", line 12
        /*0070*/               @P2 BRA `(.L_x_0) ;
        /*0080*/                   IADD3 R1, R1, 0x1, RZ ;
        /*0090*/                   BRA `(.L_x_0) ;
        /*00a0*/                   EXIT ;
"""


def test_loops_nesting_and_own_instructions():
    instrs, labels = sass_loops.parse_sass(SASS)
    assert len(instrs) == 11 and labels == {".L_x_0": 1, ".L_x_1": 4, ".L_x_2": 7}
    outer, inner = sass_loops.find_loops(SASS)
    assert (outer.start, outer.end, outer.depth, outer.instructions) == (1, 9, 0, 9)
    assert (inner.start, inner.end, inner.depth, inner.instructions) == (4, 6, 1, 3)
    assert outer.own == 6 and inner.own == 3
    assert inner.lines == {"k.py:20": 3}
    assert outer.lines == {"k.py:10": 2, "k.py:12": 4}


def test_cli_prints_the_loops(tmp_path, capsys):
    path = tmp_path / "k.sass"
    path.write_text(SASS)
    sass_loops.main([str(path), "--top", "1"])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("11 instructions")
    assert out[1:] == ["[1-9] 9 / 6: k.py:12 x4", "  [4-6] 3 / 3: k.py:20 x3"]


@pytest.mark.parametrize("text", [None, "no instructions here\n"])
def test_cli_bad_input_is_a_clear_error(tmp_path, text):
    path = tmp_path / "k.sass"
    if text is not None:
        path.write_text(text)
    with pytest.raises(SystemExit, match="no such file" if text is None else "no SASS"):
        sass_loops.main([str(path)])


def test_span_counts_one_pass_of_a_files_code(tmp_path, capsys):
    """The span from a file's first to its last instruction, its top-level loops counted their
    trips: the inner loop's file alone (3 instructions, x3: 9); k.py's span [1, 10] with the
    outer loop (9 instructions, the inner one inside it) x3: 10 + 2 x 9; a wrong number of trip
    counts or a file with no instruction is an error; the command line prints one pass."""
    text = SASS.replace('k.py", line 20', 'inner.py", line 20')
    first, last, loops, total = sass_loops.span_count(text, "inner.py", [3])
    assert (first, last, [(lp.start, lp.end) for lp in loops], total) == (4, 6, [(4, 6)], 9)
    first, last, loops, total = sass_loops.span_count(text, "k.py", [3])
    assert (first, last, [(lp.start, lp.end) for lp in loops], total) == (1, 10, [(1, 9)], 28)
    with pytest.raises(ValueError, match="2 trip counts for 1 loops"):
        sass_loops.span_count(text, "k.py", [2, 2])
    with pytest.raises(ValueError, match="no instruction comes from other.py"):
        sass_loops.span_count(text, "other.py")
    path = tmp_path / "k.sass"
    path.write_text(text)
    sass_loops.main([str(path), "--span", "inner.py", "--trips", "3"])
    assert "inner.py: span [4-6] 3 instructions; loops inside: [4-6] 3 x3; one pass: 9" in (
        capsys.readouterr().out)


# a persistent kernel: a prologue, its ticket loop (.L_x_0) with an inner loop (.L_x_1) and two
# calls of $f, then the called function $f with a loop of its own (.L_x_2)
TICKET = """\
\t.section\t.text.k,"ax",@progbits
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   MOV R2, c[0x0][0x30] ;
.L_x_0:
\t//## File "/src/kernels/k.py", line 10
        /*0020*/                   IMAD R2, R3, R4, RZ ;
.L_x_1:
\t//## File "/src/kernels/k.py", line 20
        /*0030*/                   FADD R6, R6, R6 ;
        /*0040*/               @P0 BRA `(.L_x_1) ;
\t//## File "/src/kernels/k.py", line 11
        /*0050*/                   CALL.REL.NOINC `($k$f) ;
        /*0060*/                   CALL.REL.NOINC `($k$f) ;
        /*0070*/               @P2 BRA `(.L_x_0) ;
        /*0080*/                   EXIT ;
$k$f:
\t//## File "/src/kernels/f.py", line 30
        /*0090*/                   FMUL R8, R8, R8 ;
.L_x_2:
        /*00a0*/                   FFMA R9, R9, R9, R9 ;
        /*00b0*/               @P1 BRA `(.L_x_2) ;
        /*00c0*/                   RET.REL.NODEC R20 `(k) ;
"""


def test_ticket_counts_one_trip_with_its_calls_and_loops(tmp_path, capsys):
    """One trip of the ticket loop [2-7]: its 6 instructions, the inner loop's 2 run 3 times
    (k.py:20=3: +4), and $f called twice, each time 4 instructions with its 2-instruction loop run
    twice (f.py:30=2: 4 + 2 = 6): 6 + 4 + 2 x 6 = 22; the prologue and the EXIT after the loop
    count nothing; without trips, 6 + 2 x 4 = 14. A malformed trip is a clear error."""
    ticket, calls, total = sass_loops.ticket_count(TICKET, {"k.py:20": 3, "f.py:30": 2})
    assert (ticket.start, ticket.end, calls, total) == (2, 7, {"$k$f": 2}, 22)
    assert sass_loops.ticket_count(TICKET, {})[2] == 14
    with pytest.raises(ValueError, match="no loop"):
        sass_loops.ticket_count(SASS.replace("BRA `(.L_x_0)", "BRA `(.L_x_9)")
                                .replace("BRA `(.L_x_1)", "BRA `(.L_x_9)"), {})  # fmt: skip
    path = tmp_path / "t.sass"
    path.write_text(TICKET)
    sass_loops.main([str(path), "--ticket", "--loop-trips", "k.py:20=3", "f.py:30=2"])
    assert capsys.readouterr().out.strip() == (
        "ticket loop [2-7] 6 instructions; calls: f x2; one ticket: 22\n"
        "  barriers: 0\n  shared: 0\n  global: 0\n  shuffles: 0\n"
        "  L1 wavefronts at least: 0 (shared 0, global 0; a warp, one a cycle an SM)")
    with pytest.raises(SystemExit, match="FILE:LINE=N"):
        sass_loops.main([str(path), "--ticket", "--loop-trips", "k.py:20"])


def test_ticket_counts_the_calls_of_called_functions():
    """A function that $f calls ($g, 2 instructions) counts once per call of $f (twice a ticket):
    22 + 2 x 2 = 26 with the trips; a function that calls itself is an error, not a hang."""
    text = TICKET.replace(
        "        /*00c0*/                   RET.REL.NODEC R20 `(k) ;\n",
        "        /*00b8*/                   CALL.REL.NOINC `($k$g) ;\n"
        "        /*00c0*/                   RET.REL.NODEC R20 `(k) ;\n"
        "$k$g:\n"
        "        /*00d0*/                   FADD R3, R3, R3 ;\n"
        "        /*00e0*/                   RET.REL.NODEC R20 `(k) ;\n")  # fmt: skip
    _, calls, total = sass_loops.ticket_count(text, {"k.py:20": 3, "f.py:30": 2})
    # $f: 5 instructions now (its CALL), the loop's 2 once more: 7; $g: 2
    assert (calls, total) == ({"$k$f": 2, "$k$g": 2}, 6 + 4 + 2 * 7 + 2 * 2)
    loop = text.replace("CALL.REL.NOINC `($k$g)", "CALL.REL.NOINC `($k$f)")
    with pytest.raises(ValueError, match="recursive call"):
        sass_loops.ticket_count(loop, {})


def test_ticket_warns_of_loop_trips_that_count_nothing(tmp_path, capsys):
    """A --loop-trips line that no loop but the ticket loop has its own code at (a line an edit
    moved: k.py:21; the ticket loop's own k.py:10) sets no trips: named on stderr, and the count
    is the one without it."""
    trips = {"k.py:20": 3, "k.py:21": 2, "k.py:10": 5, "f.py:30": 2}
    assert sass_loops.unused_trips(TICKET, trips) == ["k.py:21", "k.py:10"]
    assert sass_loops.unused_trips(TICKET, {"k.py:20": 3, "f.py:30": 2}) == []
    path = tmp_path / "t.sass"
    path.write_text(TICKET)
    sass_loops.main([str(path), "--ticket", "--loop-trips", "k.py:21=3", "f.py:30=2"])
    out, err = capsys.readouterr()
    assert "one ticket: 18" in out  # 6 + 2 x 6: the inner loop once
    assert "--loop-trips k.py:21: no loop here" in err and "f.py:30" not in err


def test_ticket_counts_barriers_and_shared_memory_by_line(tmp_path, capsys):
    """The ticket's CTA barriers and shared-memory instructions, weighted like the count: a
    barrier in the inner loop (k.py:20, 3 trips) issues 3 a ticket; in $f (called twice) an LDS
    before its loop issues 2 and a predicated STS inside the loop (2 trips) 4, both f.py:30; the
    prologue's barrier counts nothing."""
    text = (TICKET.replace("FADD R6, R6, R6", "BAR.SYNC.DEFER_BLOCKING 0x0")
            .replace("FMUL R8, R8, R8", "LDS R8, [R2]")
            .replace("FFMA R9, R9, R9, R9", "@!P0 STS [UR4], R9")
            .replace("MOV R2, c[0x0][0x30]", "BAR.SYNC.DEFER_BLOCKING 0x0"))  # fmt: skip
    trips = {"k.py:20": 3, "f.py:30": 2}
    assert sass_loops.ticket_ops(text, trips, "barriers") == {"k.py:20": 3}
    assert sass_loops.ticket_ops(text, trips, "shared") == {"f.py:30": 6}
    assert sass_loops.ticket_count(text, trips)[2] == 22  # the kinds are a part of the count
    path = tmp_path / "t.sass"
    path.write_text(text)
    sass_loops.main([str(path), "--ticket", "--loop-trips", "k.py:20=3", "f.py:30=2"])
    assert capsys.readouterr().out.strip().splitlines()[1:3] == [
        "  barriers: 3 (k.py:20 x3)", "  shared: 6 (f.py:30 x6)"]


def test_ticket_ops_name_the_kernel_line_before_a_library_line(tmp_path, capsys):
    """With callers, an instruction from Triton's own library (a ``tl.sum``'s barrier in
    triton/language/standard.py) is named with the kernel line before it: the barrier in the inner
    loop (after k.py:20) and the LDS in $f (after f.py:30, not k.py:11, the last line before the
    call site); the loop trips still match the kernel lines they name. Without, the library line
    alone."""
    lib = '\t//## File "/venv/lib/python3.12/site-packages/triton/language/standard.py", line 293\n'
    back = '\t//## File "/src/kernels/k.py", line 20\n'  # the inner loop's branch: k.py:20 again
    bar = "        /*0030*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;\n"
    fadd = "        /*0030*/                   FADD R6, R6, R6 ;\n"
    text = (TICKET.replace(fadd, lib + bar + back)
            .replace("        /*00a0*/", lib + "        /*00a0*/")
            .replace("FFMA R9, R9, R9, R9", "LDS R9, [R2]")
            .replace("        /*00b0*/", back.replace("k.py\", line 20", "f.py\", line 30")
                     + "        /*00b0*/"))  # fmt: skip
    trips = {"k.py:20": 3, "f.py:30": 2}
    assert sass_loops.ticket_ops(text, trips, "barriers", callers=True) == {
        "standard.py:293<k.py:20": 3}
    assert sass_loops.ticket_ops(text, trips, "shared", callers=True) == {
        "standard.py:293<f.py:30": 4}
    assert sass_loops.ticket_ops(text, trips, "barriers") == {"standard.py:293": 3}
    path = tmp_path / "t.sass"
    path.write_text(text)
    sass_loops.main([str(path), "--ticket", "--callers", "--loop-trips", "k.py:20=3", "f.py:30=2"])
    assert capsys.readouterr().out.strip().splitlines()[1:3] == [
        "  barriers: 3 (standard.py:293<k.py:20 x3)", "  shared: 4 (standard.py:293<f.py:30 x4)"]


def test_ticket_counts_global_memory_shuffles_and_the_fewest_l1_wavefronts(tmp_path, capsys):
    """Global loads and stores (an LDG.E.128 in the inner loop, 3 trips; an STG.E.64 in $f's
    loop, twice a call, 2 calls) and shuffles by line; the L1 wavefronts they and the shared
    instructions take at least: 32 lanes x 16 B = 4 wavefronts of 128 B for each LDG.E.128 (12),
    2 for each STG.E.64 (8), 4 for the LDSM.16.M88.4 in $f (2 a ticket: 8); shuffles none."""
    text = (TICKET.replace("FADD R6, R6, R6", "LDG.E.128 R4, desc[UR4][R2.64]")
            .replace("FMUL R8, R8, R8", "LDSM.16.M88.4 R8, [R2]")
            .replace("FFMA R9, R9, R9, R9", "@!P0 STG.E.64 desc[UR4][R2.64], R8")
            .replace("MOV R2, c[0x0][0x30]", "SHFL.BFLY PT, R3, R2, 0x1, 0x1f"))  # fmt: skip
    trips = {"k.py:20": 3, "f.py:30": 2}
    assert sass_loops.ticket_ops(text, trips, "global") == {"k.py:20": 3, "f.py:30": 4}
    assert sass_loops.ticket_ops(text, trips, "shuffles") == {}  # in the prologue: not a ticket's
    assert [sass_loops.wavefronts(i) for i in ("LDS R1, [R2]", "LDS.64 R2, [R3]",
            "@P0 STS.128 [R1], R4", "LDSM.16.MT88.2 R4, [R2]", "STSM.16.M88 [R1], R4",
            "LDG.E.EF.64 R2, desc[UR4][R2.64]", "@!P1 LDG.E R4, desc[UR4][R2.64]",
            "ATOMG.E.ADD.STRONG.GPU PT, R3, [R2], R4", "SHFL.BFLY PT, R3, R2, 0x1, 0x1f",
            "FADD R1, R1, R1")] == [1, 2, 4, 2, 1, 2, 1, 1, 0, 0]
    path = tmp_path / "t.sass"
    path.write_text(text)
    sass_loops.main([str(path), "--ticket", "--loop-trips", "k.py:20=3", "f.py:30=2"])
    assert capsys.readouterr().out.strip().splitlines()[2:] == [
        "  shared: 2 (f.py:30 x2)", "  global: 7 (f.py:30 x4, k.py:20 x3)", "  shuffles: 0",
        "  L1 wavefronts at least: 28 (shared 8, global 20; a warp, one a cycle an SM)"]
