"""`python -m serve_app run configs/local.yaml`: Ray's `serve` CLI in the fast ingress mode (see `launch`)."""

from serve_app.launch import main

main()
