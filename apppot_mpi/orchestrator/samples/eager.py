"""An example policy file: apppot-orchestrator run|simulate --policy FILE."""

from apppot_mpi.orchestrator.policy import Policy


class Eager(Policy):
    """One node per waiting job, given back after 30 s idle."""

    def new_node_needed(self):
        return len(self.orch.candidates) > len(self.orch.alive_nodes())

    def can_stop(self, node):
        return node.idle_for(self.orch.now) > 30
