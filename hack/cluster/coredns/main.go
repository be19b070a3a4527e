// Command coredns is CoreDNS of the pinned release with only the plugins the local cluster's DNS needs:
// it answers the cluster domain from the API server (kubernetes plugin) and nothing else. There is
// deliberately no forward plugin: names outside the cluster get SERVFAIL/NXDOMAIN, never the host's
// resolver.
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/bind"
	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/ready"
)

// The plugins' order of execution: a subsequence of the release's own list (core/dnsserver).
func init() {
	dnsserver.Directives = []string{"bind", "ready", "health", "errors", "log", "cache", "kubernetes"}
}

func main() {
	coremain.Run()
}
