"""The two roles of the parameter-server job (server and worker) and what they share."""
