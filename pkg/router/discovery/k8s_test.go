package discovery

import (
	"context"
	"slices"
	"testing"
	"time"

	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"
)

func slice(name, service string, port int32, ready map[string]bool) *discoveryv1.EndpointSlice {
	pn := "grpc"
	s := &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Name: name, Namespace: "serving", Labels: map[string]string{discoveryv1.LabelServiceName: service}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       []discoveryv1.EndpointPort{{Name: &pn, Port: &port}},
	}
	for ip, r := range ready {
		s.Endpoints = append(s.Endpoints, discoveryv1.Endpoint{Addresses: []string{ip}, Conditions: discoveryv1.EndpointConditions{Ready: &r}})
	}
	return s
}

// TestEndpointSlices: ready endpoints of the Service's slices, on the
// named port, following updates; other Services' slices are ignored.
func TestEndpointSlices(t *testing.T) {
	client := fake.NewClientset(
		slice("ctx-a", "kvferry-ctx", 9100, map[string]bool{"10.0.0.1": true, "10.0.0.2": false}),
		slice("gen-a", "kvferry-gen", 9200, map[string]bool{"10.0.1.1": true}),
	)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	e, err := NewEndpointSlices(ctx, client, "serving", "kvferry-ctx", "grpc", 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer e.Shutdown()
	got, err := e.Resolve(ctx)
	if err != nil || !slices.Equal(got, []string{"10.0.0.1:9100"}) {
		t.Fatalf("first: %v %v", got, err)
	}
	// A pod becomes ready and a second slice appears.
	if _, err := client.DiscoveryV1().EndpointSlices("serving").Update(ctx, slice("ctx-a", "kvferry-ctx", 9100, map[string]bool{"10.0.0.1": true, "10.0.0.2": true}), metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := client.DiscoveryV1().EndpointSlices("serving").Create(ctx, slice("ctx-b", "kvferry-ctx", 9100, map[string]bool{"10.0.0.3": true}), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	want := []string{"10.0.0.1:9100", "10.0.0.2:9100", "10.0.0.3:9100"}
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for {
		got, err = e.Resolve(ctx)
		if err == nil && slices.Equal(got, want) {
			break
		}
		select {
		case <-tick.C:
		case <-ctx.Done():
			t.Fatalf("after updates: %v %v, want %v", got, err, want)
		}
	}
}
