package peers

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/url"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"

	"github.com/fwdproxy/fwdproxy/internal/meshtest"
)

// fakeAWS speaks the slices of the instance metadata service (IMDSv2), the Auto Scaling query API
// and the EC2 query API that peer discovery uses, on loopback.
type fakeAWS struct {
	mu        sync.Mutex
	calls     []string // Action names in order
	forms     map[string]url.Values
	throttle  int // answer DescribeAutoScalingGroups with Throttling this many times first
	privateIP string
}

func (f *fakeAWS) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	f.mu.Lock()
	defer f.mu.Unlock()
	switch {
	case r.Method == http.MethodPut && r.URL.Path == "/latest/api/token":
		w.Header().Set("X-Aws-Ec2-Metadata-Token-Ttl-Seconds", "21600")
		fmt.Fprint(w, "token-123")
		return
	case strings.HasPrefix(r.URL.Path, "/latest/"):
		if r.Header.Get("X-Aws-Ec2-Metadata-Token") != "token-123" {
			http.Error(w, "no token", http.StatusUnauthorized)
			return
		}
		switch r.URL.Path {
		case "/latest/meta-data/instance-id":
			fmt.Fprint(w, "i-self")
		case "/latest/dynamic/instance-identity/document":
			fmt.Fprint(w, `{"region":"eu-west-3","instanceId":"i-self","accountId":"123456789012"}`)
		default:
			http.NotFound(w, r)
		}
		return
	}
	if err := r.ParseForm(); err != nil {
		http.Error(w, err.Error(), 400)
		return
	}
	action := r.PostForm.Get("Action")
	f.calls = append(f.calls, action)
	f.forms[action] = r.PostForm
	if !strings.Contains(r.Header.Get("Authorization"), "eu-west-3") {
		http.Error(w, "request not signed for the instance's region", http.StatusForbidden)
		return
	}
	w.Header().Set("Content-Type", "text/xml")
	switch action {
	case "DescribeAutoScalingInstances":
		fmt.Fprint(w, `<DescribeAutoScalingInstancesResponse xmlns="http://autoscaling.amazonaws.com/doc/2011-01-01/"><DescribeAutoScalingInstancesResult><AutoScalingInstances><member><InstanceId>i-self</InstanceId><AutoScalingGroupName>fwdproxy-fleet</AutoScalingGroupName><LifecycleState>InService</LifecycleState></member></AutoScalingInstances></DescribeAutoScalingInstancesResult><ResponseMetadata><RequestId>r1</RequestId></ResponseMetadata></DescribeAutoScalingInstancesResponse>`)
	case "DescribeAutoScalingGroups":
		if f.throttle > 0 {
			f.throttle--
			w.WriteHeader(http.StatusBadRequest)
			fmt.Fprint(w, `<ErrorResponse><Error><Type>Sender</Type><Code>Throttling</Code><Message>Rate exceeded</Message></Error><RequestId>r2</RequestId></ErrorResponse>`)
			return
		}
		fmt.Fprint(w, `<DescribeAutoScalingGroupsResponse xmlns="http://autoscaling.amazonaws.com/doc/2011-01-01/"><DescribeAutoScalingGroupsResult><AutoScalingGroups><member><AutoScalingGroupName>fwdproxy-fleet</AutoScalingGroupName><Instances>
<member><InstanceId>i-self</InstanceId><LifecycleState>InService</LifecycleState></member>
<member><InstanceId>i-b</InstanceId><LifecycleState>Pending</LifecycleState></member>
<member><InstanceId>i-c</InstanceId><LifecycleState>InService</LifecycleState></member>
<member><InstanceId>i-gone</InstanceId><LifecycleState>Terminating</LifecycleState></member>
</Instances></member></AutoScalingGroups></DescribeAutoScalingGroupsResult><ResponseMetadata><RequestId>r3</RequestId></ResponseMetadata></DescribeAutoScalingGroupsResponse>`)
	case "DescribeInstances":
		fmt.Fprintf(w, `<DescribeInstancesResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/"><requestId>r4</requestId><reservationSet><item><reservationId>r-1</reservationId><instancesSet>
<item><instanceId>i-self</instanceId><privateIpAddress>%s</privateIpAddress><instanceState><code>16</code><name>running</name></instanceState></item>
<item><instanceId>i-b</instanceId><privateIpAddress>10.1.0.12</privateIpAddress><instanceState><code>0</code><name>pending</name></instanceState></item>
<item><instanceId>i-c</instanceId><privateIpAddress>10.1.0.13</privateIpAddress><instanceState><code>80</code><name>stopped</name></instanceState></item>
</instancesSet></item></reservationSet></DescribeInstancesResponse>`, f.privateIP)
	default:
		http.Error(w, "unexpected action "+action, 400)
	}
}

func testAWSConfig() *aws.Config {
	return &aws.Config{
		Credentials: aws.CredentialsProviderFunc(func(context.Context) (aws.Credentials, error) {
			return aws.Credentials{AccessKeyID: "AKIDTEST", SecretAccessKey: "secret", Source: "test"}, nil
		}),
	}
}

func TestAWSDiscoveryFindsTheGroupsInstances(t *testing.T) {
	fake := &fakeAWS{forms: map[string]url.Values{}, throttle: 1, privateIP: "10.1.0.11"}
	srv := httptest.NewServer(fake)
	defer srv.Close()
	a := &AWS{Endpoint: srv.URL, IMDSEndpoint: srv.URL, Port: 7946, Config: testAWSConfig()}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	got, err := a.Discover(ctx)
	if err != nil {
		t.Fatal(err)
	}
	// The stopped and terminating instances are left out.
	if want := []string{"10.1.0.11:7946", "10.1.0.12:7946"}; !slices.Equal(got, want) {
		t.Fatalf("peers %v, want %v", got, want)
	}
	fake.mu.Lock()
	defer fake.mu.Unlock()
	// The group was found from this instance's ID; a throttled call was retried.
	want := []string{"DescribeAutoScalingInstances", "DescribeAutoScalingGroups", "DescribeAutoScalingGroups", "DescribeInstances"}
	if !slices.Equal(fake.calls, want) {
		t.Fatalf("calls %v, want %v", fake.calls, want)
	}
	if g := fake.forms["DescribeAutoScalingGroups"].Get("AutoScalingGroupNames.member.1"); g != "fwdproxy-fleet" {
		t.Fatalf("group asked for: %q", g)
	}
	ids := []string{}
	for i := 1; i <= 4; i++ {
		if v := fake.forms["DescribeInstances"].Get(fmt.Sprintf("InstanceId.%d", i)); v != "" {
			ids = append(ids, v)
		}
	}
	if !slices.Equal(ids, []string{"i-self", "i-b", "i-c"}) {
		t.Fatalf("instances described: %v", ids)
	}
}

func TestAWSDiscoveryJoinsTheFleet(t *testing.T) {
	first := startPeer(t, "peer-00", peerOpts{})
	host, port, _ := splitHostPort(first.tr.Addr())
	fake := &fakeAWS{forms: map[string]url.Values{}, privateIP: host}
	srv := httptest.NewServer(fake)
	defer srv.Close()
	a := &AWS{Region: "eu-west-3", AutoScalingGroup: "fwdproxy-fleet", Endpoint: srv.URL, Port: port, Config: testAWSConfig()}

	tr, err := newFaultyTransport()
	if err != nil {
		t.Fatal(err)
	}
	n, err := Start(Config{Name: "peer-01", Bind: "127.0.0.1:0", Profile: "local", Tune: fastTimings, Transport: tr, Discover: a.Discover})
	if err != nil {
		t.Fatal(err)
	}
	defer n.Close()
	meshtest.Eventually(t, 10*time.Second, "the peer found through AWS is joined", func() bool { return n.ml.NumMembers() == 2 })
	fake.mu.Lock()
	defer fake.mu.Unlock()
	if slices.Contains(fake.calls, "DescribeAutoScalingInstances") {
		t.Fatal("the configured group should be used without asking for this instance's group")
	}
}

func TestAWSDiscoveryErrorsNameTheFix(t *testing.T) {
	srv := httptest.NewServer(http.NotFoundHandler())
	defer srv.Close()
	a := &AWS{Region: "eu-west-3", Endpoint: srv.URL, IMDSEndpoint: srv.URL, Port: 7946, Config: testAWSConfig()}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	_, err := a.Discover(ctx)
	if err == nil || !strings.Contains(err.Error(), "peers.aws.autoScalingGroup") {
		t.Fatalf("error %v should name peers.aws.autoScalingGroup", err)
	}
}
