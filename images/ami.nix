# The AWS worker image (AMI): NixOS with the agent as a systemd service that reads its job,
# worker id, NATS URL and token from the instance's user-data (see nixos-module.nix for the
# format). Built as a VHD by nixpkgs' amazon-image script: `nix build .#ami`.
{ modulesPath, ... }:
{
  imports = [ "${modulesPath}/../maintainers/scripts/ec2/amazon-image.nix" ];

  services.cedana-agent = {
    enable = true;
    userData.enable = true;
  };

  # amazon-init would take the user-data for a NixOS configuration and run nixos-rebuild with it;
  # here the user-data is the agent's settings.
  virtualisation.amazon-init.enable = false;

  # Operators reach a worker over SSH (keys from the instance metadata, set up by the amazon
  # image); the module puts `cedana-agent` and `criu` on the PATH for `cedana-agent check`.

  documentation.enable = false;

  # Workers are built fresh and thrown away; there is no state to migrate between releases.
  system.stateVersion = "25.05";
}
