"""The process in its cluster: layout, strategy, devices, bounded waits, preemption, restarts."""
