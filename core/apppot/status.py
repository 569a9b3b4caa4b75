"""Exit statuses of apppot-start (and the per-appliance part of mpirun).

0-255 is the program's own status, and 128+N when a signal N killed it.
When the program's status is unknown the launcher returns one of these
(documented in README and ``apppot-start --help``); a one-line reason is
always printed on stderr, so a program that happens to use the same code is
still told apart.
"""

BOOT_FAILED = 120  # the appliance did not boot, or init failed before PROG
GUEST_CRASHED = 121  # guest kernel panic, or UML died while PROG ran
TIMEOUT = 124  # --timeout expired (as GNU timeout)
APPPOT_ERROR = 125  # bad input or configuration; nothing was started
CANNOT_EXECUTE = 126  # PROG found but not executable (set by guest init)
NOT_FOUND = 127  # PROG not found in the appliance (set by guest init)

DESCRIPTIONS = {
    BOOT_FAILED: "the appliance failed to boot",
    GUEST_CRASHED: "the appliance crashed",
    TIMEOUT: "timeout expired",
    APPPOT_ERROR: "bad input or configuration",
    CANNOT_EXECUTE: "program not executable",
    NOT_FOUND: "program not found",
}


def from_signal(signum):
    return 128 + signum


def lowest_failed_rank(statuses):
    """Open MPI's rule on {rank: status}: the lowest rank that exited
    non-zero; ranks killed by a signal (the job's own abort kills the
    others) count only when no rank failed by itself.  None: none failed."""
    for limit in (128, 255):
        failed = [r for r, c in statuses.items() if 0 < c <= limit]
        if failed:
            return min(failed)
    return None


def lowest_failed(statuses):
    """The job's status by that rule: the lowest failed rank's, else 0."""
    rank = lowest_failed_rank(statuses)
    return 0 if rank is None else statuses[rank]


def help_text():
    lines = [f"  {code}  {text}" for code, text in sorted(DESCRIPTIONS.items())]
    return ("exit status: the program's own (128+N if killed by signal N), "
            "or:\n" + "\n".join(lines))
