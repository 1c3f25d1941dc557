"""Job specs, container and launchers that run the trainer on Vertex AI, Kubernetes and Slurm."""
