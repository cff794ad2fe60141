"""Provider-neutral rendering of everything a control-plane host runs.

Pure functions returning text: no Pulumi resources, no provider imports. Targets feed
the results to machines in their own way (SSH on bare metal, boot scripts on clouds).
"""
