"""apppot-orchestrator: grow a batch cluster with appliance compute nodes.

The 2012 VM-MAD idea, rebuilt: each cycle the orchestrator reads the batch
system's queue and nodes, asks a policy whether to start or stop nodes, and
starts or stops them through a provider (local appliances running slurmd,
Apache Libcloud, or an appliance submitted as a job elsewhere).  The same
policy code replays accounting logs in simulation mode.
"""
