package discovery

import (
	"context"
	"fmt"
	"net"
	"sort"
	"strconv"
	"time"

	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	listers "k8s.io/client-go/listers/discovery/v1"
	"k8s.io/client-go/tools/cache"
)

// EndpointSlices watches the EndpointSlices of a Kubernetes Service with a
// client-go informer and answers with the ready endpoints' addresses on
// the named port. Resolve reads the informer's cache: it never calls the
// API server itself.
type EndpointSlices struct {
	service   string
	namespace string
	portName  string
	lister    listers.EndpointSliceNamespaceLister
	factory   informers.SharedInformerFactory
}

// NewEndpointSlices starts an informer for the slices of service in
// namespace, running until ctx is done, and waits up to syncTimeout for its
// first sync. Stop it with Shutdown.
func NewEndpointSlices(ctx context.Context, client kubernetes.Interface, namespace, service, portName string, syncTimeout time.Duration) (*EndpointSlices, error) {
	sel := labels.Set{discoveryv1.LabelServiceName: service}.String()
	factory := informers.NewSharedInformerFactoryWithOptions(client, 0, informers.WithNamespace(namespace),
		informers.WithTweakListOptions(func(o *metav1.ListOptions) { o.LabelSelector = sel }))
	inf := factory.Discovery().V1().EndpointSlices()
	e := &EndpointSlices{service: service, namespace: namespace, portName: portName, lister: inf.Lister().EndpointSlices(namespace), factory: factory}
	informer := inf.Informer()
	factory.Start(ctx.Done())
	sctx, cancel := context.WithTimeout(ctx, syncTimeout)
	defer cancel()
	if !cache.WaitForCacheSync(sctx.Done(), informer.HasSynced) {
		factory.Shutdown()
		return nil, fmt.Errorf("discovery: endpoint slices of %s/%s did not sync within %s", namespace, service, syncTimeout)
	}
	return e, nil
}

// Resolve returns host:port of every ready endpoint, sorted.
func (e *EndpointSlices) Resolve(context.Context) ([]string, error) {
	slices, err := e.lister.List(labels.Everything())
	if err != nil {
		return nil, fmt.Errorf("discovery: list endpoint slices: %w", err)
	}
	seen := map[string]bool{}
	for _, s := range slices {
		port := ""
		for _, p := range s.Ports {
			if p.Port != nil && (e.portName == "" || (p.Name != nil && *p.Name == e.portName)) {
				port = strconv.Itoa(int(*p.Port))
				break
			}
		}
		if port == "" {
			continue
		}
		for _, ep := range s.Endpoints {
			if ep.Conditions.Ready != nil && !*ep.Conditions.Ready {
				continue
			}
			for _, a := range ep.Addresses {
				seen[net.JoinHostPort(a, port)] = true
			}
		}
	}
	out := make([]string, 0, len(seen))
	for a := range seen {
		out = append(out, a)
	}
	sort.Strings(out)
	if len(out) == 0 {
		return nil, fmt.Errorf("discovery: no ready endpoint for %s/%s port %q", e.namespace, e.service, e.portName)
	}
	return out, nil
}

func (e *EndpointSlices) String() string {
	return "k8s:" + e.namespace + "/" + e.service + ":" + e.portName
}

// Shutdown stops the informer and waits for its goroutines.
func (e *EndpointSlices) Shutdown() { e.factory.Shutdown() }
