"""The host side: the trio balloon device, what it records, the VMM and the vhost-user backend."""
