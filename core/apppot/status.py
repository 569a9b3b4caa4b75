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


def help_text():
    lines = [f"  {code}  {text}" for code, text in sorted(DESCRIPTIONS.items())]
    return ("exit status: the program's own (128+N if killed by signal N), "
            "or:\n" + "\n".join(lines))
