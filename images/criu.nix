# CRIU for the worker images, the NixOS module and the dev shell.
#
# Cedana needs CRIU 4.2 or newer: CRIU before 4.1 cannot run on Linux 6.13+ (vDSO layout) and 4.1
# cannot dump a process holding a TCP or UDP socket on Linux 6.16+ (SO_PASSCRED restricted to unix
# and netlink sockets; fixed in 4.2). nixpkgs carried CRIU 4.0 for a long time, so when the locked
# nixpkgs has an older `criu`, its own recipe is built from the 4.2 release instead; a newer
# nixpkgs CRIU is used as is.
{ lib, criu, fetchFromGitHub }:
let
  minimum = "4.2";
  pinned = "4.2";
in
if lib.versionAtLeast criu.version minimum then
  criu
else
  criu.overrideAttrs (old: {
    version = pinned;
    src = fetchFromGitHub {
      owner = "checkpoint-restore";
      repo = "criu";
      rev = "v${pinned}";
      # NAR hash of the v4.2 tag's tree as GitHub archives it (the tag has no .gitattributes, so
      # `git archive v4.2` is the same tree). Computed with nix-hash from `git archive`; the same
      # method gives nixpkgs' own hash for v4.0 (sha256-D16s6pGW…), which checks the method.
      hash = "sha256-yZWIpCNTRG0LNGt01BvT3ILl3elzKtCfRKWR0rzJqAU=";
    };
    # Patches in the recipe were written for its older release; 4.2 carries those fixes.
    patches = [ ];
    # The recipe stamps its own version into the Makefile's release name.
    postPatch = builtins.replaceStrings
      [ "head-name = ${old.version}.0" ]
      [ "head-name = ${pinned}.0" ]
      (old.postPatch or "");
  })
