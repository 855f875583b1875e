"""Operations: logging set-up, systemd notification, metrics (I/O shell)."""
